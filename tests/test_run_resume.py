"""``dilm-ray run`` ends cleanly on SIGTERM during evaluation and ``run --resume`` finishes it.

What ran is counted, not inferred from files: ``timing.json`` counts each stage's executions
and each evaluation job, and MLflow holds one child run per evaluation job that finished.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import mlflow
import pandas as pd
import pytest

from dilm_ray.config import load_config
from dilm_ray.tracking.mlflow_store import mlflow_run

STAGES = ("pretrain", "distill", "synthesize_dilm", "synthesize_lm_only", "coreset")
JOBS = 5 * 2  # dilm, lm_only, random, k_centers, herding x (2 sets x 1 seed)


@pytest.mark.integration
def test_sigterm_during_evaluation_then_resume_runs_only_what_is_left(tiny_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # evaluation jobs of ~1 s each, so that the signal lands between the first and the last
    overrides = [*tiny_overrides, "tracking.enabled=true", f"tracking.uri={uri}", "evaluate.steps=150", "evaluate.parallel=true"]
    command = [sys.executable, "-m", "dilm_ray.cli", "run", "configs/sst2-cpu.yaml", *overrides]
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
    run_dir = tmp_path / "runs" / "t"
    runs_csv = run_dir / "results" / "runs.csv"

    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and first.poll() is None:
        if runs_csv.is_file() and runs_csv.stat().st_size and len(pd.read_csv(runs_csv)) >= 2:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "first.log").read_text()[-3000:]
    assert "add --resume to continue" in (tmp_path / "first.log").read_text()

    mlflow.set_tracking_uri(uri)
    parents = mlflow.search_runs(experiment_names=["dilm-sst2"], filter_string="tags.command = 'run'")
    assert list(parents["status"]) == ["KILLED"]
    kept = pd.read_csv(runs_csv)
    timing = json.loads((run_dir / "timing.json").read_text())
    assert 2 <= len(kept) < JOBS
    assert {s: timing["runs"][s] for s in STAGES} == {s: 1 for s in STAGES}
    assert timing["runs"]["evaluation runs"] == len(kept)

    second = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage in STAGES:
        assert f"[{stage}] done earlier, skipped" in second.stdout
    assert f"[evaluate] {len(kept)} of {JOBS} runs done earlier" in second.stdout
    timing = json.loads((run_dir / "timing.json").read_text())
    assert {s: timing["runs"][s] for s in STAGES} == {s: 1 for s in STAGES}  # no stage ran again
    assert timing["runs"]["evaluation runs"] == JOBS  # each job ran once over both invocations
    runs = pd.read_csv(runs_csv)
    assert len(runs) == JOBS and len(runs.drop_duplicates(["method", "dpc", "set_index", "seed"])) == JOBS
    pd.testing.assert_frame_equal(runs.head(len(kept)), kept)

    parents = mlflow.search_runs(experiment_names=["dilm-sst2"], filter_string="tags.command = 'run'")
    assert list(parents["status"]) == ["FINISHED"]  # the same run, reopened and finished
    children = mlflow.search_runs(experiment_names=["dilm-sst2"], filter_string=f"tags.mlflow.parentRunId = '{parents.run_id[0]}'")
    assert len(children) == JOBS and children["tags.mlflow.runName"].nunique() == JOBS


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), "KILLED"), (RuntimeError("boom"), "FAILED")])
def test_an_interrupted_command_run_is_killed_and_resume_reopens_it(tmp_path, error, status):
    cfg = load_config(None, ["name=x", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    ids = tmp_path / "mlflow-runs.json"
    with pytest.raises(type(error)):
        with mlflow_run(cfg, "evaluate", ids) as run_id:
            mlflow.log_metric("m", 1.0)
            raise error
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).info.status == status
    with mlflow_run(cfg, "evaluate", ids, resume=True) as again:
        mlflow.log_metric("m", 2.0)
    assert again == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "m")] == [1.0, 2.0]
    with mlflow_run(cfg, "evaluate", ids) as fresh:  # without resume: a new run
        pass
    assert fresh != run_id


def test_sigterm_becomes_an_interrupt_that_names_the_signal():
    from dilm_ray import interrupts

    previous = signal.getsignal(signal.SIGTERM)
    try:
        interrupts.install()
        with pytest.raises(KeyboardInterrupt) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert isinstance(caught.value, interrupts.Interrupted) and interrupts.exit_code(caught.value) == 143
        # a library that re-raises it as a plain KeyboardInterrupt (Ray's wait loop) still reports SIGTERM
        assert interrupts.exit_code(KeyboardInterrupt()) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        interrupts._last_signal = None


def test_an_interrupt_while_records_are_written_waits_for_them():
    from dilm_ray import interrupts

    previous = signal.getsignal(signal.SIGTERM)
    written = []
    try:
        interrupts.install()
        with pytest.raises(interrupts.Interrupted):
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                written.append("row")  # still runs: the signal waits for the block to end
        assert written == ["row"] and signal.getsignal(signal.SIGTERM) is interrupts._raise
    finally:
        signal.signal(signal.SIGTERM, previous)
