"""Start-up checks (issue 31, items 4, 6, 9): the embedded Ray by default, an unreachable Ray
cluster or MLflow server in one line within seconds, file-backed stores refused on a multi-node
cluster, cloud storage URIs kept as they are.

Every server these tests start binds 127.0.0.1 and is stopped by the test that started it.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dilm_ray.cli import main
from dilm_ray.config import load_config
from dilm_ray.driver.ray_env import grpc_answers
from dilm_ray.driver.startup import cluster_checks
from dilm_ray.errors import UserError
from dilm_ray.tracking.mlflow_store import check_tracking_server, file_backed

LIMIT_S = 10.0  # issue 31: an unreachable cluster or server fails within 10 s


def _closed_port() -> int:
    """A port nothing listens on, on any interface (Ray turns 127.0.0.1 into the machine's own address)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def _timed_run(args: list[str]) -> tuple[object, float]:
    start = time.monotonic()
    result = CliRunner().invoke(main, args)
    return result, time.monotonic() - start


# --- Ray ------------------------------------------------------------------------------------

EMBEDDED = textwrap.dedent(
    """
    import json, sys
    import ray
    from dilm_ray.config import load_config
    from dilm_ray.driver.ray_env import ensure_ray, grpc_answers
    from dilm_ray.driver.startup import spread_reason

    ensure_ray(load_config(None, ["threads=1"]))
    try:
        gcs = ray._private.worker._global_node.address_info["gcs_address"]
        host, _, port = gcs.rpartition(":")
        alive = sum(1 for n in ray.nodes() if n["Alive"])
        spread = spread_reason(ray.nodes(), ray.get_runtime_context().get_node_id())
        print(json.dumps({"gcs": gcs, "alive": alive, "probe": grpc_answers(host, int(port)), "spread": spread}))
    finally:
        ray.shutdown()
    """
)


def test_the_embedded_default_ignores_a_dead_cluster_recorded_on_the_machine(tmp_path):
    """Ray's ``ray_current_cluster`` names a dead head: a bare ``ray.init()`` retried it for
    minutes; the default starts an embedded Ray of its own instead."""
    import json

    temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    stale = f"127.0.0.1:{_closed_port()}"
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text(stale)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_TMPDIR"))}
    env.update(RAY_TMPDIR=str(temp), RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", EMBEDDED], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    start = time.monotonic()
    try:
        out, err = proc.communicate(timeout=150)  # an embedded start takes 5-30 s on 2 busy cores
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the test's own process group: the driver and the Ray it started
        proc.communicate()
        pytest.fail("ensure_ray did not return in 150 s: it is retrying the recorded (dead) cluster")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, err[-3000:]
    started = json.loads(out.strip().splitlines()[-1])
    assert started["alive"] == 1 and started["gcs"].rpartition(":")[2] != stale.rpartition(":")[2]
    assert started["probe"] is None  # the reachability probe accepts a real GCS
    assert started["spread"] is None  # ray.nodes() read as the cluster checks read it: one node with CPUs
    print(f"embedded Ray started and stopped in {elapsed:.1f} s")


def test_an_unreachable_ray_address_is_one_line_within_10_s(tiny_overrides, tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    result, elapsed = _timed_run(["run", "configs/sst2-cpu.yaml", *tiny_overrides, f"ray.address={address}"])
    assert result.exit_code == 2, result.output + repr(result.exception)
    [line] = _error_lines(result)
    assert line.startswith(f"error: ray.address {address}") and "no Ray cluster is reachable there" in line
    assert elapsed < LIMIT_S, f"{elapsed:.1f} s"
    assert not (tmp_path / "runs").exists()  # nothing written


def test_ray_address_from_the_environment_is_named_as_such(tiny_overrides, tmp_path, monkeypatch):
    address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    result, elapsed = _timed_run(["pretrain", "configs/sst2-cpu.yaml", *tiny_overrides])
    assert result.exit_code == 2, result.output + repr(result.exception)
    [line] = _error_lines(result)
    assert line.startswith(f"error: RAY_ADDRESS {address}") and "unset RAY_ADDRESS" in line
    assert elapsed < LIMIT_S, f"{elapsed:.1f} s"


def test_a_port_that_answers_but_not_as_ray_is_refused_in_seconds():
    """A silent listener and an HTTP/1 server (the dashboard's port, given by mistake): the TCP
    connection succeeds, the HTTP/2 greeting a gRPC server sends does not come."""
    with socket.socket() as silent, socket.socket() as http1:
        for s in (silent, http1):
            s.bind(("127.0.0.1", 0))
            s.listen()

        def answer_http1() -> None:
            conn, _ = http1.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer_http1, daemon=True).start()
        start = time.monotonic()
        assert grpc_answers("127.0.0.1", silent.getsockname()[1], timeout_s=1.0) == "no answer within 1 s"
        assert 0.9 < time.monotonic() - start < 3
        assert "not Ray's" in grpc_answers("127.0.0.1", http1.getsockname()[1], timeout_s=5.0)
    assert grpc_answers("127.0.0.1", _closed_port()) == "Connection refused"


def test_every_command_that_runs_stages_is_checked_first():
    from dilm_ray.cli import STAGE_COMMANDS

    assert STAGE_COMMANDS == set(main.commands) - {"validate", "ui"}


# --- MLflow ---------------------------------------------------------------------------------


def test_an_unreachable_tracking_server_is_one_line_within_10_s(tiny_overrides, tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    overrides = [o for o in tiny_overrides if not o.startswith("tracking.")]
    result, elapsed = _timed_run(["run", "configs/sst2-cpu.yaml", *overrides, f"tracking.uri={uri}"])
    assert result.exit_code == 2, result.output + repr(result.exception)
    [line] = _error_lines(result)
    assert line.startswith(f"error: tracking.uri {uri}: no MLflow server answers there")
    assert elapsed < LIMIT_S, f"{elapsed:.1f} s"
    assert not (tmp_path / "runs").exists()


class _Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, answers", [(200, True), (401, True), (404, True), (503, False)])
def test_the_tracking_server_probe_reads_the_health_answer(status, answers):
    handler = type("Handler", (_Status,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        cfg = load_config(None, [f"tracking.uri=http://127.0.0.1:{server.server_port}"])
        if answers:
            check_tracking_server(cfg)
        else:
            with pytest.raises(UserError, match=r"^tracking.uri http://127.0.0.1:\d+: the MLflow server there is failing \(/health answered HTTP 503\)"):
                check_tracking_server(cfg)
    finally:
        server.shutdown()
        server.server_close()


def test_a_silent_tracking_server_times_out_and_other_stores_are_not_probed(monkeypatch):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        with pytest.raises(UserError, match=r"\(no answer; 0.5 s timeout\)"):
            check_tracking_server(load_config(None, [f"tracking.uri=http://127.0.0.1:{silent.getsockname()[1]}"]), timeout_s=0.5)
        assert time.monotonic() - start < 3
    closed = f"http://127.0.0.1:{_closed_port()}"
    check_tracking_server(load_config(None, [f"tracking.uri={closed}", "tracking.enabled=false"]))  # tracking off: not asked
    check_tracking_server(load_config(None, ["tracking.uri=sqlite:///nowhere/mlflow.db"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    with pytest.raises(UserError, match=f"^MLFLOW_TRACKING_URI {closed}: "):
        check_tracking_server(load_config(None, []))


# --- multi-node clusters --------------------------------------------------------------------


def test_file_backed_stores():
    assert all(map(file_backed, ["sqlite:///x/mlflow.db", "file:///x/mlruns", "mlruns", "/abs/mlruns", "C:\\mlruns"]))
    assert not any(map(file_backed, ["http://h:5000", "https://h", "postgresql://u@h/db", "databricks"]))


def _node(node_id: str, cpus: float = 1.0, alive: bool = True) -> dict:
    """One entry of ``ray.nodes()`` (the keys the checks read)."""
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpus} if cpus else {}}


ONE = [_node("head", cpus=2)]
TWO = [_node("head", cpus=0), _node("w1"), _node("w2", alive=False), _node("w3")]  # 3 live nodes
AUTOSCALING = [_node("head", cpus=0)]  # clusters/*.yaml: a head with --num-cpus=0, workers added on demand


def test_a_cluster_whose_work_runs_elsewhere_refuses_what_differs_between_nodes(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    absolute = f"output_dir={tmp_path}"
    default = load_config(None, [absolute])
    cluster_checks(default, ONE, "head")  # one node with CPUs: the default stays as it is
    with pytest.raises(UserError, match=r"^tracking.uri \(unset: the default\) sqlite:///.*: a file-backed MLflow store .* 3 live nodes"):
        cluster_checks(default, TWO, "head")
    with pytest.raises(UserError, match=r"^tracking.uri .* has no CPUs, so its work runs on other nodes"):
        cluster_checks(default, AUTOSCALING, "head")
    for uri in ("sqlite:////shared/mlflow.db", "file:///shared/mlruns", "/shared/mlruns"):
        with pytest.raises(UserError, match=f"^tracking.uri {uri}: a file-backed"):
            cluster_checks(load_config(None, [absolute, f"tracking.uri={uri}"]), TWO, "head")
    server = ["tracking.uri=http://head:5000"]
    cluster_checks(load_config(None, [absolute, *server]), TWO, "head")
    cluster_checks(load_config(None, [absolute, "tracking.enabled=false"]), TWO, "head")  # nothing logged, nothing to share
    with pytest.raises(UserError, match=r"^output_dir runs: a relative path"):
        cluster_checks(load_config(None, [*server, "output_dir=runs"]), TWO, "head")  # resolved at load: named as given
    cluster_checks(load_config(None, ["output_dir=runs"]), ONE, "head")
    with pytest.raises(UserError, match=r"^ray.storage_path ckpt: a relative path"):
        cluster_checks(load_config(None, [absolute, *server, "ray.storage_path=ckpt"]), TWO, "head")
    cluster_checks(load_config(None, [absolute, *server, "ray.storage_path=s3://bucket/dilm"]), TWO, "head")


def test_the_cli_reads_the_cluster_before_any_stage(tiny_overrides, tmp_path, monkeypatch):
    """``run`` with ``ray.address`` on a cluster of 3 live nodes (and a dead one): the default
    SQLite store is refused before anything is written. Connecting is stubbed here; the
    multi-node cluster tests run the real path."""
    import ray

    import dilm_ray.driver.startup as startup

    connected = []
    monkeypatch.setattr(startup, "ensure_ray", lambda cfg: connected.append(cfg.ray.address))
    monkeypatch.setattr(ray, "nodes", lambda: TWO)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Context", (), {"get_node_id": lambda self: "head"})())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [o for o in tiny_overrides if not o.startswith("tracking.")]
    result = CliRunner().invoke(main, ["run", "configs/sst2-cpu.yaml", *overrides, "ray.address=head:6379"])
    assert result.exit_code == 2, result.output + repr(result.exception)
    [line] = _error_lines(result)
    assert line.startswith("error: tracking.uri (unset: the default) sqlite:///") and "3 live nodes" in line
    assert connected == ["head:6379"] and not (tmp_path / "runs").exists()
    monkeypatch.setattr(ray, "nodes", lambda: ONE)  # one node with CPUs: as before
    startup.startup_checks(load_config(None, [*overrides, "ray.address=head:6379"]))


# --- storage --------------------------------------------------------------------------------


def test_cloud_storage_uris_reach_ray_unchanged(tiny_overrides, monkeypatch):
    """``ray.storage_path=s3://...`` reaches ``RunConfig(storage_path=...)`` as given (it was
    resolved into ``<cwd>/s3:/bucket/x``); the earlier run of the stage is cleared through the
    URI's filesystem (stubbed here: no bucket is reachable from the tests)."""
    import ray.train.torch

    import dilm_ray.driver.progress as progress
    import dilm_ray.driver.ray_env as ray_env
    from dilm_ray.driver import ray_train

    captured, cleared = {}, []

    class Built(Exception):
        pass

    class FakeTrainer:
        def __init__(self, *args, run_config, **kwargs):
            captured["run_config"] = run_config
            raise Built

    monkeypatch.setattr(ray_env, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(progress, "board", lambda: None)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(ray_train, "clear_storage", lambda storage, name: cleared.append((storage, name)))
    for uri in ("s3://bucket/dilm/ckpt", "gs://bucket/x"):
        cfg = load_config(None, [*tiny_overrides, f"ray.storage_path={uri}"])
        assert ray_train.storage_root(cfg) == uri
        with pytest.raises(Built):
            ray_train.fit_stage(cfg, "pretrain")
        assert captured["run_config"].storage_path == uri
        assert cleared[-1] == (uri, "t-pretrain")


def test_local_storage_paths_are_absolute_and_uris_are_cleared_through_their_filesystem(tmp_path, monkeypatch):
    from dilm_ray.driver.ray_train import clear_storage, is_uri, storage_root

    monkeypatch.chdir(tmp_path)
    assert storage_root(load_config(None, ["ray.storage_path=ckpt"])) == tmp_path / "ckpt"
    assert storage_root(load_config(None, [f"output_dir={tmp_path}", "name=n"])) == tmp_path / "n" / "ray"
    assert is_uri("s3://b/x") and is_uri("file:///x") and not is_uri("relative/s3:/x") and not is_uri("/abs")
    for storage in (tmp_path / "local", f"file://{tmp_path / 'uri'}"):  # file:// goes through pyarrow.fs, as s3:// does
        folder = Path(str(storage).removeprefix("file://")) / "run-pretrain"
        (folder / "checkpoint_000001").mkdir(parents=True)
        clear_storage(storage, "run-pretrain")
        assert not folder.exists() and folder.parent.exists()
        clear_storage(storage, "run-pretrain")  # already gone: nothing to do
