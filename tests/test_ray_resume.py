"""A stage whose driver is killed (or interrupted with Ctrl-C) mid-run continues from its latest checkpoint with ``--resume``.

The command runs in its own session with its own embedded Ray. The whole process tree is frozen,
then killed, as a lost laptop session or head node would be: Ray puts its workers in their own
process groups, so killing the driver's group alone let the Train controller and worker run on
and register checkpoints up to the last step before they noticed.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from dilm_ray.train.state import TrainState
from tests.test_ray_train import _registered_checkpoint

pytestmark = pytest.mark.integration

STEPS = 400


def _command(tiny_overrides, *extra):
    overrides = [*tiny_overrides, f"pretrain.steps={STEPS}", "pretrain.log_every=20", "pretrain.checkpoint_every=20", "name=crash"]
    return [sys.executable, "-m", "dilm_ray.cli", "pretrain", "configs/sst2-cpu.yaml", *overrides, *extra]


def _kill_tree(pid: int) -> None:
    """SIGSTOP the process and all its descendants (none reports again), then SIGKILL them."""
    stopped: dict[int, psutil.Process] = {}
    while True:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        new = [p for p in procs if p.pid not in stopped]
        if not new:
            break
        for proc in new:
            stopped[proc.pid] = proc
            try:
                proc.send_signal(signal.SIGSTOP)
            except psutil.NoSuchProcess:
                pass
    for proc in stopped.values():
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _latest_step(run_dir) -> int:
    return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]["metrics"]["step"]


def test_resume_after_the_driver_is_killed(tiny_overrides, tmp_path):
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
    run_dir = tmp_path / "runs" / "crash" / "ray" / "crash-pretrain"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_command(tiny_overrides), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not _registered_checkpoint(run_dir):
            time.sleep(0.1)
        assert _registered_checkpoint(run_dir), (tmp_path / "first.log").read_text()[-2000:]
    finally:
        _kill_tree(first.pid)
        first.wait()
    assert _latest_step(run_dir) < STEPS, "the first run finished before the kill"

    second = subprocess.run(_command(tiny_overrides, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    state = TrainState.load(tmp_path / "runs" / "crash" / "generator-lm" / "train_state.pt")
    assert state.step == STEPS
    resumed = state.extra.get("resumed_from")
    assert resumed and 0 < resumed[0] < STEPS, state.extra


def test_ctrl_c_during_a_train_stage_ends_cleanly_and_resume_continues(tiny_overrides, tmp_path):
    """Ctrl-C at a terminal (SIGINT to the command's process group) during stage 1. Ray Train's
    ``fit`` installs its own SIGINT handler, which aborts the stage and raises ``SystemExit(0)``:
    the command ended with exit status 1, no message and its MLflow run left RUNNING. Now it ends
    as an interrupt (130, the resume hint, run KILLED), and ``--resume`` continues stage 1 from its
    latest checkpoint."""
    import mlflow

    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = 120  # the interrupt lands after the first registered checkpoint (step 20); fewer to redo than STEPS
    tracking = ["tracking.enabled=true", f"tracking.uri={uri}", f"pretrain.steps={steps}"]
    run_dir = tmp_path / "runs" / "crash" / "ray" / "crash-pretrain"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_command(tiny_overrides, *tracking), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not _registered_checkpoint(run_dir):
            time.sleep(0.1)
        assert _registered_checkpoint(run_dir), (tmp_path / "first.log").read_text()[-2000:]
        os.killpg(first.pid, signal.SIGINT)
        code = first.wait(timeout=120)
    finally:
        _kill_tree(first.pid)
        first.wait()
    printed = (tmp_path / "first.log").read_text()
    assert code == 128 + signal.SIGINT, printed[-3000:]
    assert "interrupted (SIGINT): finished stages and evaluation runs are kept; add --resume to continue" in printed
    assert "Traceback" not in printed, printed[-3000:]
    mlflow.set_tracking_uri(uri)
    parents = mlflow.search_runs(experiment_names=["dilm-sst2"], filter_string="tags.command = 'pretrain'")
    assert list(parents["status"]) == ["KILLED"]
    assert _latest_step(run_dir) < steps, "the first run finished before the interrupt"

    second = subprocess.run(_command(tiny_overrides, *tracking, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    state = TrainState.load(tmp_path / "runs" / "crash" / "generator-lm" / "train_state.pt")
    assert state.step == steps
    resumed = state.extra.get("resumed_from")
    assert resumed and 0 < resumed[0] < steps, state.extra
