"""``ray job submit`` to a head started with ``ray start``, the way clusters/README.md says,
under Ray 2.60's token authentication.

The test owns everything it starts: a head node with its own temp dir, its own free ports and
its own token (in a file, given to the head and to the client through ``RAY_AUTH_MODE=token``
and ``RAY_AUTH_TOKEN_PATH``; HOME is a temp folder, so no ``~/.ray/auth_token`` of the machine
is read or written). It stops exactly the processes it started (the ``ray start --block``
process tree, plus anything carrying its marker variable), never with ``ray stop``, which
would end every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest

BIN = Path(sys.executable).parent  # the venv's bin: ray, dilm-ray, python
REPO = Path(__file__).parents[1]
JOBS = 5 * 2  # dilm, lm_only, random, k_centers, herding x (2 sets x 1 seed)
MARKER = "DILM_RAY_TEST_JOB_SUBMISSION"  # inherited by every process of the test's cluster


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports the OS calls free now (all bound at once, so no repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _base_env(home: Path, temp_dir: Path) -> dict[str, str]:
    """The test process's environment without any Ray address or auth setting (conftest.py
    sets RAY_AUTH_MODE=disabled for the in-process Ray of the other tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS", "RAY_TMPDIR"))}
    env.update(HOME=str(home), RAY_TMPDIR=str(temp_dir), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _ours(marker_value: str, root_pid: int) -> list[psutil.Process]:
    """The head's process tree plus every process carrying this test's marker (a process whose
    parent died is re-parented, so the tree alone could miss it)."""
    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(root_pid)
        found[root.pid] = root
        for child in root.children(recursive=True):
            found[child.pid] = child
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter():
        try:
            if proc.pid not in found and proc.environ().get(MARKER) == marker_value:
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


def _stop(head: subprocess.Popen, marker_value: str) -> None:
    """SIGTERM to every process of the test's cluster at once, SIGKILL to what is left after 10 s
    (SIGTERM to ``ray start --block`` alone makes it stop the node one process at a time: 20 s+)."""
    procs = _ours(marker_value, head.pid)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    alive += [p for p in _ours(marker_value, head.pid) if p.pid not in {q.pid for q in procs}]  # started meanwhile
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=5)


def _wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start exited:\n" + log.read_text()[-3000:]
        try:
            # /api/version needs no token; a 401 also proves the dashboard is up
            urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"dashboard at {url} not up after {timeout} s:\n" + log.read_text()[-3000:])


@pytest.mark.integration
def test_job_submission_to_a_token_authenticated_head(tiny_overrides, tmp_path):
    temp_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray socket paths must stay < 107 bytes
    home = tmp_path / "home"
    home.mkdir()
    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    marker_value = str(temp_dir)

    # the auth settings a user puts on every node and on the submitting machine
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    (gcs, dashboard, client_server, agent_http, agent_grpc, runtime_env_agent, metrics, node_manager,
     object_manager) = _free_ports(9)
    address = f"http://127.0.0.1:{dashboard}"
    # RAY_API_SERVER_ADDRESS: only because this machine may run other Ray instances. Ray
    # Train's placement-group cleaner calls the State API without an address, and Ray's
    # auto-detection then fails with "Found multiple active Ray instances".
    head_env = {**_base_env(home, temp_dir), **auth, MARKER: marker_value, "RAY_API_SERVER_ADDRESS": address}
    client_env = {**_base_env(home, temp_dir), **auth}
    no_token_env = _base_env(home, temp_dir)  # no RAY_AUTH_*, no ~/.ray/auth_token in this HOME
    head_log = tmp_path / "head.log"
    head_cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp_dir),
        "--port", str(gcs),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client_server), "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env_agent),
        "--metrics-export-port", str(metrics), "--node-manager-port", str(node_manager),
        "--object-manager-port", str(object_manager),
    ]

    # the job's working dir: just the config (what --working-dir uploads); every path in the
    # overrides is absolute, since the driver runs in a temporary copy of this folder
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "sst2-cpu.yaml", work / "configs")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # sqlite:////abs/path
    assert uri.startswith("sqlite:////")
    entrypoint = ["dilm-ray", "run", "configs/sst2-cpu.yaml", *tiny_overrides,
                  "tracking.enabled=true", f"tracking.uri={uri}", "evaluate.parallel=true"]

    def submit(env: dict[str, str], submission_id: str) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", submission_id,
               "--working-dir", str(work), "--", *entrypoint]
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    with open(head_log, "w") as log:
        head = subprocess.Popen(head_cmd, env=head_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_dashboard(address, head, head_log)

        # the trap: without the token the dashboard refuses the submission
        refused = submit(no_token_env, "dilm-no-token")
        assert refused.returncode != 0
        assert "Authentication required" in refused.stdout + refused.stderr
        assert "Missing authentication token" in refused.stdout + refused.stderr

        done = submit(client_env, "dilm-run")
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-5000:] + "\nhead:\n" + head_log.read_text()[-2000:]
        assert "Job 'dilm-run' succeeded" in output, output[-5000:]
        for method in ("dilm", "lm_only", "random", "k_centers", "herding"):
            assert f"| {method} |" in output  # the results table, in the job's logs

        status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, "dilm-run"],
                                env=client_env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "succeeded" in status.stdout + status.stderr, status.stdout + status.stderr

        # the evaluation ran as Ray tasks of this cluster (not of a Ray embedded in the driver)
        tasks = subprocess.run([str(BIN / "ray"), "list", "tasks", "--address", address, "--filter", "name=_remote_call",
                                "--filter", "state=FINISHED", "--format", "json", "--limit", "1000"],
                               env=client_env, capture_output=True, text=True, timeout=60)
        assert tasks.returncode == 0, tasks.stdout + tasks.stderr
        assert len(json.loads(tasks.stdout)) == JOBS, tasks.stdout[-3000:]

        # the driver ran on this head: its run folder and MLflow store are where the overrides say
        runs = pd.read_csv(tmp_path / "runs" / "t" / "results" / "runs.csv")
        assert len(runs) == JOBS
        store = mlflow.MlflowClient(uri)
        experiment = store.get_experiment_by_name("dilm-sst2").experiment_id
        parents = store.search_runs([experiment], filter_string="tags.command = 'run'")
        assert [r.info.status for r in parents] == ["FINISHED"]
        children = store.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
        assert len(children) == JOBS and {r.info.status for r in children} == {"FINISHED"}
        assert {r.data.tags["command"] for r in children} == {"evaluate-run"}
    finally:
        _stop(head, marker_value)
        left = _ours(marker_value, head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes left running: {[p.pid for p in left]}"
