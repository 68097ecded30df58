"""Tune: the ranked trial table, and a sweep of 4 tiny trials with ASHA on a local Ray, recorded in MLflow."""


import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from dilm_ray.cli import main


def test_ranked_table_orders_trials_and_reports_minutes():
    from dilm_ray.commands.tune import ranked_table

    df = pd.DataFrame({"trial_id": ["a", "b"], "accuracy": [0.6, 0.7], "sets_evaluated": [2, 3], "time_total_s": [120.0, 300.0],
                       "config/distill.lr": [1e-5, 3e-6], "config/distill.steps": [5, 5]})
    table = ranked_table(df, ["distill.lr"], "accuracy", "max")
    assert list(table.columns) == ["trial_id", "accuracy", "sets_evaluated", "minutes", "distill.lr"]
    assert list(table.trial_id) == ["b", "a"] and list(table.minutes) == [5.0, 2.0]
    assert list(ranked_table(df, ["distill.lr"], "accuracy", "min").trial_id) == ["a", "b"]


@pytest.mark.integration
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
    assert "| rank | trial | accuracy | sets_evaluated | minutes | distill.inner_loop | distill.gm_syn_dpc |" in result.output
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
