"""Tune: the ranked trial table, and a sweep of 4 tiny trials with ASHA on a local Ray, recorded in MLflow."""


import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from dilm_ray.cli import main


def _outcome(trial_id, status, score=None, lr=1e-5, sets=3, minutes=2.0, reason=""):
    from dilm_ray.commands.tune import TrialOutcome

    metrics = {} if score is None else {"accuracy": score, "runs": sets}
    return TrialOutcome(trial_id, status, {"distill.lr": lr}, metrics, minutes, reason)


def test_ranking_lists_every_trial_scored_first_failed_last():
    from dilm_ray.commands.tune import ranked_table, to_markdown

    outcomes = [
        _outcome("a", "FINISHED", 0.6, minutes=2.0),
        _outcome("x", "ERROR", reason="GenerationError: stage distill: only 0/20 well-formed samples"),
        _outcome("b", "STOPPED", 0.7, lr=3e-6, sets=1, minutes=5.0),
    ]
    table = ranked_table(outcomes, ["distill.lr"], "accuracy", "max")
    assert list(table.columns) == ["trial_id", "status", "accuracy", "runs", "minutes", "distill.lr", "reason"]
    # the FINISHED trial's 3 runs outrank the STOPPED trial's better single run
    assert list(table.trial_id) == ["a", "b", "x"] and list(table.minutes) == [2.0, 5.0, 2.0]
    more = outcomes + [_outcome("c", "FINISHED", 0.65), _outcome("d", "STOPPED", 0.5, sets=2)]
    assert list(ranked_table(more, ["distill.lr"], "accuracy", "max").trial_id) == ["c", "a", "d", "b", "x"]
    assert list(ranked_table(more, ["distill.lr"], "accuracy", "min").trial_id) == ["a", "c", "d", "b", "x"]
    md = to_markdown(table).splitlines()
    assert md[0] == "| rank | trial | status | accuracy | runs | minutes | distill.lr | reason |"
    assert md[3] == "| 2 | b | STOPPED | 0.7 | 1 | 5 | 3e-06 |  |"  # learning rates stay readable
    assert md[4] == "| - | x | ERROR |  | 0 | 2 | 1e-05 | GenerationError: stage distill: only 0/20 well-formed samples |"
    # no failure: no reason column
    assert "reason" not in to_markdown(ranked_table(outcomes[:1], ["distill.lr"], "accuracy", "max"))


def test_the_values_a_sweep_tries_come_from_the_config_seed(tmp_path):
    from ray.tune.experiment import Experiment

    from dilm_ray.commands.tune import search_algorithm, search_space
    from dilm_ray.config import load_config

    def trials(seed):
        cfg = load_config("configs/sst2-cpu.yaml", [f"seed={seed}", "tune.num_samples=2", "tune.max_concurrent_trials=4"])
        algorithm = search_algorithm(cfg)
        algorithm.add_configurations([Experiment("sweep", lambda config: None, config=search_space(cfg.tune.space),
                                                num_samples=cfg.tune.num_samples, storage_path=str(tmp_path))])
        drawn = []
        while (trial := algorithm.next_trial()) is not None:
            drawn.append(trial.config)
        return drawn

    first = trials(42)
    assert len(first) == 4 and first == trials(42)  # 2 grid points x 2 samples, the same values again
    assert first != trials(43)


def test_the_status_line_says_what_each_running_trial_last_did(tmp_path):
    from types import SimpleNamespace

    from dilm_ray.commands.tune import status_line, trial_activity, trial_dir
    from dilm_ray.config import load_config
    from dilm_ray.layout import RunLayout

    cfg = load_config("configs/sst2-cpu.yaml", [f"output_dir={tmp_path}"])
    run_dir = trial_dir(cfg, "a1_00000")
    assert run_dir == tmp_path / "sst2-cpu" / "tune" / "trials" / "trial-a1_00000"
    layout = RunLayout(run_dir)
    assert trial_activity(run_dir) == ""  # nothing written yet
    layout.worker_log("distill", 0).parent.mkdir(parents=True)
    layout.worker_log("distill", 0).write_text("[distill 5] match_loss=0.3 seconds_match=1.0\n[distill 10] match_loss=0.2 seconds_match=1.1\n")
    assert trial_activity(run_dir) == "[distill 10] match_loss=0.2"
    layout.method_dir("dilm").mkdir(parents=True)
    assert trial_activity(run_dir) == "synthesis"
    layout.runs_csv.parent.mkdir(parents=True)
    layout.runs_csv.write_text("score\n0.6\n0.7\n")
    assert trial_activity(run_dir) == "evaluation, 2 runs done"
    trials = [SimpleNamespace(trial_id=i, status=s) for i, s in (("a1_00000", "RUNNING"), ("a1_00001", "RUNNING"), ("a1_00002", "PENDING"),
                                                                 ("a1_00003", "TERMINATED"), ("a1_00004", "ERROR"))]
    line = status_line(15.04, trials, {"a1_00000": "synthesis", "a1_00001": ""})
    assert line == "[tune] 15.0 min: 2 running (a1_00000: synthesis, a1_00001), 1 pending, 1 done, 1 failed"


def test_error_reason_is_the_exception_line_without_module_path():
    from dilm_ray.commands.tune import error_reason
    from dilm_ray.errors import GenerationError

    trace = ("Traceback (most recent call last):\n  File x\nray.exceptions.RayTaskError(ValueError): ray::f()\n"
             "builtins.ValueError: kmeans needs 1 <= k <= n\n  hint: use 1e-5 for v0.2.\n\n")
    assert error_reason(None, trace) == "ValueError: kmeans needs 1 <= k <= n"
    assert error_reason(GenerationError("stage distill: the generator wrote only 1/120"), trace) == (
        "GenerationError: stage distill: the generator wrote only 1/120")
    assert error_reason(None, None) == "failed (no error recorded)"


@pytest.mark.integration
@pytest.mark.slow  # 86 s; make test's sweeps: the failing-trials sweep, the shipped MNLI config's, the node-loss trial
def test_sweep_of_four_trials_with_asha_lands_in_mlflow(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "tune", "configs/sst2-cpu.yaml", *tiny_overrides,
        "tracking.enabled=true", f"tracking.uri={uri}", "name=sweep",
        "tune.space={distill.inner_loop: {type: grid, values: [1, 2]}, distill.gm_syn_dpc: {type: grid, values: [1, 2]}}",
        "distill.steps=2", "tune.scheduler=asha", "tune.grace_period=1", "synthesize.n_datasets=2",
        "evaluate.parallel=false", "ray.cpus_per_worker=0.9",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "best config:" in result.output
    # Tune prints every param_space key in its progress lines: only the searched ones belong there
    assert "generator.max_length" not in result.output
    ranking = [line for line in result.output.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(ranking) == 4
    assert "| rank | trial | status | accuracy | runs | minutes | distill.inner_loop | distill.gm_syn_dpc |" in result.output
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["dilm-sst2"])
    parent = runs[runs["tags.mlflow.runName"] == "sweep-tune"]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    children = runs[runs["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]]
    assert len(children) == 4 and set(children["status"]) == {"FINISHED"}
    assert set(children["params.distill.inner_loop"]) == {"1", "2"}
    # the rest of each trial's resolved config is there too, not only the searched keys
    assert set(children["params.distill.steps"]) == {"2"} and set(children["params.generator.max_length"]) == {"12"}
    assert children["metrics.accuracy"].between(0, 1).all()
    sweep = tmp_path / "runs" / "sweep"
    assert (sweep / "tune" / "best.yaml").is_file()
    # trials embed the train rows once, into the sweep's cache
    assert len(list((sweep / "cache").glob("train-embeddings-*.pt"))) == 1
    assert all((trial / "cache").is_symlink() for trial in (sweep / "tune" / "trials").iterdir())
    assert list((tmp_path / "runs" / "sweep" / "tune" / "best-distilled").glob("dpc2/set*/train.parquet"))

    # one evaluation path: `dilm-ray evaluate` with a trial's config re-runs the trial's runs, score for score
    trial = sorted((sweep / "tune" / "trials").iterdir())[0]
    ran = pd.read_csv(trial / "results" / "runs.csv")
    assert len(ran) >= 1 and set(ran.method) == {"dilm"}
    again = CliRunner().invoke(main, ["evaluate", str(trial / "config.yaml")])
    assert again.exit_code == 0, again.output + repr(again.exception)
    rerun = pd.read_csv(trial / "results" / "runs.csv")
    job = ["learner", "method", "dpc", "set_index", "seed", "set_digest", "eval_key"]
    merged = ran.merge(rerun, on=job, suffixes=("_trial", "_evaluate"))
    assert len(merged) == len(ran)
    assert (merged.score_trial == merged.score_evaluate).all() and (merged.accuracy_trial == merged.accuracy_evaluate).all()


@pytest.mark.integration
def test_failed_trials_are_ranked_last_and_a_sweep_that_only_fails_exits_1(tiny_overrides, tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # learner.model=no-such-learner passes the config but not the trial: its stage 2 cannot build the learner
    base = ["tune", "configs/sst2-cpu.yaml", *tiny_overrides, "name=fails", "distill.steps=2", "synthesize.n_datasets=1",
            "evaluate.parallel=false", "ray.cpus_per_worker=0.9"]
    result = CliRunner().invoke(main, [*base, f"tune.space={{learner.model: {{type: grid, values: [{tiny_bert_dir}, no-such-learner]}}}}"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    ranking = pd.read_csv(tmp_path / "runs" / "fails" / "tune" / "ranking.csv")
    assert list(ranking.status) == ["FINISHED", "ERROR"] and list(ranking["learner.model"]) == [str(tiny_bert_dir), "no-such-learner"]
    assert "learner.model" in ranking.reason.iloc[1] and "no-such-learner" in ranking.reason.iloc[1]
    assert "1 of 2 trials failed" in result.output
    failed = [line for line in result.output.splitlines() if line.startswith("[tune] trial ") and " failed: " in line]
    assert len(failed) == 1 and "no-such-learner" in failed[0], result.output  # said when it happens, with the reason
    assert any(line.startswith("| - | ") and "| ERROR |" in line for line in result.output.splitlines())
    assert (tmp_path / "runs" / "fails" / "tune" / "best.yaml").is_file()

    # the same name: stage 1 is reused, and the earlier sweep's best.yaml must not pass for this one's
    result = CliRunner().invoke(main, [*base, "tune.space={learner.model: {type: grid, values: [no-such-learner]}}"])
    assert result.exit_code == 1 and not isinstance(result.exception, (AssertionError, KeyError)), result.output
    lines = [line for line in result.output.splitlines() if line.startswith("  trial ")]
    assert len(lines) == 1 and "no-such-learner" in lines[0]
    assert "Traceback" not in result.output
    assert len(pd.read_csv(tmp_path / "runs" / "fails" / "tune" / "ranking.csv")) == 1
    assert not (tmp_path / "runs" / "fails" / "tune" / "best.yaml").exists()
    assert not (tmp_path / "runs" / "fails" / "tune" / "best-distilled").exists()


@pytest.mark.parametrize("space, message", [
    ("{distill.inner_loop: {type: grid, values: [1, 3]}}", "distill.steps=2 must be a multiple of distill.inner_loop=3 (tune.space distill.inner_loop=3)"),
    ("{distill.lr: {type: choice, values: [1e-3]}, pretrain.lr: {type: loguniform, low: 1e-5, high: 1e-3}}", "tune.space.pretrain.lr changes stage 1 (pretrain)"),
    ("{distill.lr: {type: grid, values: [1e-3]}}", "tune.metric 'f1' is not reported by trials of this task (use accuracy or score)"),
])
def test_a_space_that_cannot_work_is_refused_in_one_line_before_anything_runs(tiny_overrides, tmp_path, space, message):
    extra = ["tune.metric=f1"] if "f1" in message else []
    result = CliRunner().invoke(main, ["tune", "configs/sst2-cpu.yaml", *tiny_overrides, "distill.steps=2", f"tune.space={space}", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs" / "t").exists()  # nothing written, no stage 1


def test_trials_keep_their_checkpoints_under_the_sweeps_storage_path(tmp_path):
    from dilm_ray.commands.tune import trial_config
    from dilm_ray.config import load_config

    base = load_config(None, [f"output_dir={tmp_path}", "name=sweep"])
    assert trial_config(base, {}, "trial-a").ray.storage_path == str(tmp_path / "sweep" / "tune" / "train")
    cloud = load_config(None, [f"output_dir={tmp_path}", "name=sweep", "ray.storage_path=s3://bucket/dilm/"])
    assert trial_config(cloud, {"distill.lr": 1e-6}, "trial-a").ray.storage_path == "s3://bucket/dilm/sweep-tune"


@pytest.mark.integration
def test_ctrl_c_during_a_sweep_ends_it_unranked_and_resume_finishes_it(tiny_overrides, tmp_path):
    """Ctrl-C at a terminal (SIGINT to the command's process group) while trials run. Tune's own
    handler ends the sweep and ``Tuner.fit()`` returns as if it were done: the command ranked the
    unfinished trials, wrote best.yaml from them and exited 0. Now it ends as an interrupt (130, the
    resume hint, nothing ranked, MLflow run KILLED), and ``tune --resume`` finishes the sweep."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "dilm_ray.cli", "tune", "configs/sst2-cpu.yaml", *tiny_overrides, "name=ctrlc",
        "tracking.enabled=true", f"tracking.uri={uri}", "tune.space={distill.gm_syn_dpc: {type: grid, values: [2]}}",
        "distill.steps=20", "distill.checkpoint_every=10", "synthesize.n_datasets=1", "evaluate.parallel=false", "ray.cpus_per_worker=0.9",
    ]
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
    out = tmp_path / "runs" / "ctrlc" / "tune"
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and " started: " not in log_path.read_text():
            time.sleep(0.2)
        assert " started: " in log_path.read_text(), log_path.read_text()[-3000:]
        time.sleep(3)  # into the trial's stage 2
        os.killpg(first.pid, signal.SIGINT)
        code = first.wait(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    printed = log_path.read_text()
    assert code == 128 + signal.SIGINT, printed[-3000:]
    assert "interrupted (SIGINT): finished stages and evaluation runs are kept; add --resume to continue" in printed
    assert "best config:" not in printed and not (out / "best.yaml").exists() and not (out / "ranking.csv").exists()
    mlflow.set_tracking_uri(uri)
    parents = mlflow.search_runs(experiment_names=["dilm-sst2"], filter_string="tags.command = 'tune'")
    assert list(parents["status"]) == ["KILLED"]

    second = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "best config:" in second.stdout
    ranking = pd.read_csv(out / "ranking.csv")
    assert list(ranking.status) == ["FINISHED"], ranking
    parents = mlflow.search_runs(experiment_names=["dilm-sst2"], filter_string="tags.command = 'tune'")
    assert list(parents["status"]) == ["FINISHED"]  # the same run, reopened and finished
