"""The cluster path on one machine, the way Ray tests itself: a ``ray.cluster_utils.Cluster``
with a head that holds no CPUs and 1-CPU worker nodes, nodes SIGKILLed mid-stage, and a real
``mlflow server`` that every process logs to over HTTP.

These tests start servers and kill nodes, so they keep all traffic on loopback: they run only
in a network namespace whose one interface is ``lo`` (``make test`` enters one with
``unshare -n`` where it may, as CI does); elsewhere Ray would bind the machine's own address.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from dilm_ray.train.state import TrainState
from tests.test_ray_resume import _latest_step
from tests.test_ray_train import _registered_checkpoint


def loopback_only() -> bool:
    """True in a network namespace whose only interface is ``lo``."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not loopback_only(), reason="needs a loopback-only network namespace: run `make test` as root, or `unshare -n`"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` with a SQLite backend and ``--serve-artifacts`` on 127.0.0.1: its URI.
    The exact process group it started is stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert server.poll() is None, (root / "server.log").read_text()[-2000:]
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not answer /health in 180 s")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def cluster():
    """A head with 0 CPUs (the driver attaches there; it is never killed) and 2 worker nodes of 1 CPU."""
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR",)}
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if a failed assertion left it running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _node_of(log: Path) -> str:
    """The node id in the first ``rank r of n on node <id>`` line of a worker log."""
    for line in log.read_text().splitlines():
        if " on node " in line:
            return line.split(" on node ")[1].split()[0]
    raise AssertionError(f"no node line in {log}")


def _last_logged(log: Path) -> int:
    """The last step of a ``[pretrain N] lm_loss=...`` line in a worker log (0: none yet)."""
    steps = [int(m) for m in re.findall(r"\[pretrain (\d+)\] lm_loss", log.read_text() if log.is_file() else "")]
    return max(steps, default=0)


def _worker_node(cluster, node_id: str):
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


STEPS = 300


def test_stage_runs_across_nodes_survives_a_node_kill_and_logs_each_step_once(cluster, mlflow_server, tiny_overrides, tmp_path):
    import mlflow

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [
        sys.executable, "-m", "dilm_ray.cli", "pretrain", "configs/sst2-cpu.yaml", *tiny_overrides,
        f"pretrain.steps={STEPS}", "pretrain.log_every=5", "pretrain.checkpoint_every=50", "name=killed",
        f"ray.address={cluster.address}", "ray.num_workers=2", "ray.max_failures=1",
        "tracking.enabled=true", f"tracking.uri={mlflow_server}",
    ]
    run = tmp_path / "runs" / "killed"
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        snapshot = run / "ray" / "killed-pretrain"
        while time.time() < deadline and driver.poll() is None and not _registered_checkpoint(snapshot):
            time.sleep(0.1)
        assert _registered_checkpoint(snapshot), (tmp_path / "driver.log").read_text()[-3000:]
        # kill once steps after the checkpoint were logged: the restarted group logs them again
        checkpoint = _latest_step(snapshot)
        while time.time() < deadline and driver.poll() is None and _last_logged(run / "logs" / "pretrain-rank0.log") < checkpoint + 10:
            time.sleep(0.05)
        assert checkpoint < _last_logged(run / "logs" / "pretrain-rank0.log") < STEPS, "the stage finished before the kill"
        nodes = [_node_of(run / "logs" / f"pretrain-rank{r}.log") for r in (0, 1)]
        assert nodes[0] != nodes[1], "the two workers ran on the same node"
        killed_at = time.time()
        cluster.remove_node(_worker_node(cluster, nodes[1]), allow_graceful=False)  # SIGKILL
        cluster.add_node(num_cpus=1)  # the replacement the restarted worker group is placed on
        rank0 = run / "logs" / "pretrain-rank0.log"
        while driver.poll() is None and rank0.read_text().count(" on node ") < 2:  # the restarted group's rank 0 started
            time.sleep(0.1)
        recovered = time.time() - killed_at
        assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        print(f"stage: worker group restarted {recovered:.1f} s after the kill, finished after {time.time() - killed_at:.1f} s")
    finally:
        _stop(driver)
    state = TrainState.load(run / "generator-lm" / "train_state.pt")
    assert state.step == STEPS
    resumed = state.extra.get("resumed_from")
    assert resumed and 0 < resumed[0] < STEPS, f"the stage did not resume from a checkpoint: {state.extra}"
    # every log step appears once in MLflow, the ones between the checkpoint and the kill too
    run_id = json.loads((run / "mlflow-runs.json").read_text())["pretrain"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    steps = [m.step for m in client.get_metric_history(run_id, "pretrain.lm_loss")]
    assert sorted(steps) == list(range(5, STEPS + 1, 5)), steps
    assert client.get_run(run_id).data.params["generator.model"]  # the resolved config, over HTTP


def test_a_multi_node_cluster_refuses_a_file_backed_store_before_any_stage(cluster, tiny_overrides, tmp_path):
    db = tmp_path / "mlflow.db"
    result = subprocess.run(
        [sys.executable, "-m", "dilm_ray.cli", "pretrain", "configs/sst2-cpu.yaml", *tiny_overrides, f"ray.address={cluster.address}",
         "tracking.enabled=true", f"tracking.uri=sqlite:///{db}"],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "tracking.uri" in line]
    assert lines and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not db.exists() and not (tmp_path / "runs").exists()  # nothing half written


def _run_cli(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dilm_ray.cli", *args], env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _rows(csv: Path) -> int:
    try:
        return max(0, len(csv.read_text().splitlines()) - 1)
    except OSError:
        return 0


@pytest.mark.slow  # 50 s; make test keeps the node kills in a Train stage and in a Tune trial
def test_evaluation_survives_a_node_kill_with_every_run_once(cluster, mlflow_server, tiny_overrides, tmp_path):
    import mlflow
    import pandas as pd

    base = ["configs/sst2-cpu.yaml", *tiny_overrides, "synthesize.n_datasets=3", "evaluate.n_evals_per_dataset=2", "evaluate.steps=20",
            "evaluate.parallel=true", f"ray.address={cluster.address}", "tracking.enabled=true", f"tracking.uri={mlflow_server}"]
    made = _run_cli(["coreset", *base, "name=evalkill", "--method", "random", "--method", "k_centers"], tmp_path / "coreset.log")
    assert made.wait(timeout=300) == 0, (tmp_path / "coreset.log").read_text()[-3000:]
    run = tmp_path / "runs" / "evalkill"
    shutil.copytree(run / "distilled", tmp_path / "runs" / "unkilled" / "distilled")
    planned = 2 * 3 * 2  # methods x sets x seeds
    killed = _run_cli(["evaluate", *base, "name=evalkill"], tmp_path / "killed.log")
    try:
        deadline = time.time() + 300
        while time.time() < deadline and killed.poll() is None and _rows(run / "results" / "runs.csv") < 1:
            time.sleep(0.05)
        assert 0 < _rows(run / "results" / "runs.csv") < planned, (tmp_path / "killed.log").read_text()[-3000:]
        killed_at = time.time()
        cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)  # SIGKILL
        cluster.add_node(num_cpus=1)
        assert killed.wait(timeout=600) == 0, (tmp_path / "killed.log").read_text()[-3000:]
        print(f"evaluation: kill to finish {time.time() - killed_at:.1f} s")
    finally:
        _stop(killed)
    unkilled = _run_cli(["evaluate", *base, "name=unkilled"], tmp_path / "unkilled.log")
    assert unkilled.wait(timeout=600) == 0, (tmp_path / "unkilled.log").read_text()[-3000:]
    from dilm_ray.evaluation.job import JOB_KEY

    runs = pd.read_csv(run / "results" / "runs.csv")
    assert len(runs) == planned and not runs.duplicated(list(JOB_KEY)).any()
    # the table of the killed run is the table of one that was not killed
    assert (run / "results" / "table.md").read_text() == (tmp_path / "runs" / "unkilled" / "results" / "table.md").read_text()
    # every run once as an MLflow child of the command's run
    parent = json.loads((run / "mlflow-runs.json").read_text())["evaluate"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    assert len(children) == planned and len({c.info.run_name for c in children}) == planned


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def _node_hosting(cluster, title: str):
    """The worker node whose raylet is an ancestor of a process whose title holds ``title``, or None."""
    import psutil

    raylets = {_raylet_pid(n): n for n in cluster.worker_nodes}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if title not in " ".join(proc.info["cmdline"] or []):
                continue
            for parent in proc.parents():
                if parent.pid in raylets:
                    return raylets[parent.pid]
        except psutil.Error:
            continue
    return None


def test_tune_trial_survives_the_loss_of_its_node_and_resumes_stage_2(cluster, mlflow_server, tiny_overrides, tmp_path):
    import mlflow

    # room for the trial's function (0.1 CPU) beside a Train worker on one node, as on a GPU node
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    steps = 60
    sweep = _run_cli([
        "tune", "configs/sst2-cpu.yaml", *tiny_overrides, "name=tunekill",
        "tune.space={distill.gm_syn_dpc: {type: grid, values: [2]}}", "tune.scheduler=fifo",
        f"distill.steps={steps}", "distill.inner_loop=2", "distill.checkpoint_every=10", "distill.log_every=2", "synthesize.n_datasets=1",
        "evaluate.parallel=false", "ray.cpus_per_worker=0.9", "ray.max_failures=1",
        f"ray.address={cluster.address}", "tracking.enabled=true", f"tracking.uri={mlflow_server}",
    ], tmp_path / "tune.log")
    try:
        train = tmp_path / "runs" / "tunekill" / "tune" / "train"
        deadline = time.time() + 600
        snapshot = None
        while time.time() < deadline and sweep.poll() is None:
            found = list(train.glob("*-distill/checkpoint_manager_snapshot.json"))
            if found and _registered_checkpoint(found[0].parent):
                snapshot = found[0].parent
                break
            time.sleep(0.1)
        assert snapshot is not None, (tmp_path / "tune.log").read_text()[-3000:]
        checkpoint = _latest_step(snapshot)
        assert checkpoint < steps, "stage 2 finished before the kill"
        node = _node_hosting(cluster, "ImplicitFunc")
        assert node is not None, "no node hosts the trial's function"
        killed_at = time.time()
        cluster.remove_node(node, allow_graceful=False)
        assert sweep.wait(timeout=900) == 0, (tmp_path / "tune.log").read_text()[-3000:]
        print(f"tune: kill to finish {time.time() - killed_at:.1f} s")
    finally:
        _stop(sweep)
    trial_runs = list((tmp_path / "runs" / "tunekill" / "tune" / "trials").iterdir())
    assert len(trial_runs) == 1
    state = TrainState.load(trial_runs[0] / "generator-dilm" / "train_state.pt")
    assert state.step == steps
    resumed = state.extra.get("resumed_from")
    assert resumed and 0 < resumed[0] < steps, f"the retried trial started stage 2 over: {state.extra}"
    ranking = (tmp_path / "runs" / "tunekill" / "tune" / "ranking.csv").read_text().splitlines()
    assert len(ranking) == 2 and ",FINISHED," in ranking[1]
    assert " failed, retried (ray.max_failures): " in (tmp_path / "tune.log").read_text()  # the terminal said so when it happened
    parent = json.loads((tmp_path / "runs" / "tunekill" / "mlflow-runs.json").read_text())["tune"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    assert [c.info.status for c in children] == ["FINISHED"]
