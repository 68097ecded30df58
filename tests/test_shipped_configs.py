"""Every shipped CPU config runs ``tune`` and ``run`` to a result on its own task, as shipped but
for data sizes, lengths and step counts (integration: a local Ray, the real CLI in a subprocess).

The default suite runs the MNLI config (pairs, three labels: the headline task, whose trials
died for want of well-formed pairs) with tiny ``from_config`` models in place of the packaged
ones: the pipeline's structure (pair format, the tune space, intervals, evaluation protocol) is
the config's. With the packaged SmolLM2 and MiniLM a single config's ``tune`` alone took over
15 min on a 2-core AVX2 machine, so those runs, for every config, are marked slow
(``make test-slow``). The real GLUE copy beside the checkout is used when it is there;
otherwise a few rows of the task's columns and labels are written.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import toy_glue

REPO = Path(__file__).parents[1]
CONFIGS = sorted((REPO / "configs").glob("*-cpu.yaml"))
CASES = [pytest.param(p, "tiny", id=f"{p.stem}-tiny") for p in CONFIGS if p.stem == "mnli-cpu"] + [
    pytest.param(p, "packaged", id=f"{p.stem}-packaged", marks=pytest.mark.slow) for p in CONFIGS
]

def _data_path(config: Path, tmp_path: Path, models: str) -> str:
    shipped = yaml.safe_load(config.read_text())["data"]
    if models == "packaged" and (REPO / shipped["path"]).is_dir():  # the configs' paths are relative to the checkout
        return str((REPO / shipped["path"]).resolve())
    return str(toy_glue(tmp_path / "glue", shipped["task"]))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dilm_ray.cli", *args], capture_output=True, text=True, timeout=1800, cwd=cwd)


@pytest.mark.integration
@pytest.mark.parametrize(("config", "models"), CASES)
def test_shipped_config_tunes_and_runs_on_its_task(config, models, tmp_path, request):
    repo = REPO
    sized = [
        f"data.path={_data_path(config, tmp_path, models)}", f"output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "data.max_train_samples=60", "data.max_validation_samples=30", "data.balanced=true",
        "generator.max_length=12", "learner.max_length=16", "generator.generate_batch_size=64", "distill.learner_batch_size=4",
        "pretrain.steps=2", "pretrain.batch_size=4", "distill.steps=15", "distill.log_every=5",
        "distill.n_repset=1", "distill.repset_dpc=4", "distill.gm_real_dpc=4", "distill.gm_real_accum=1",
        "synthesize.over_sample_ratio=2", "synthesize.n_datasets=1", "evaluate.steps=2", "evaluate.eval_batch_size=32",
    ]
    if models == "tiny":
        tiny_lm, tiny_bert = request.getfixturevalue("tiny_lm_dir"), request.getfixturevalue("tiny_bert_dir")
        sized += [f"generator.model={tiny_lm}", f"learner.model={tiny_bert}", "generator.train_top_layers=null", "threads=1"]
    tuned = _cli("tune", str(repo / config), *sized, cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    run_dir = tmp_path / "runs" / config.stem
    ranking = pd.read_csv(run_dir / "tune" / "ranking.csv")
    assert len(ranking) == 2 and set(ranking.status) == {"FINISHED"}, ranking.to_string()
    assert (run_dir / "tune" / "best.yaml").is_file()
    # the terminal: a line per trial event, not Tune's table every 30 s
    events = [line for line in tuned.stdout.splitlines() if line.startswith("[tune] trial ")]
    assert sum(" started: " in e for e in events) == 2 and sum(" finished: " in e for e in events) == 2, tuned.stdout[-3000:]
    assert sum(" round " in e for e in events) == 2 and "Trial status:" not in tuned.stdout and "╭" not in tuned.stdout
    assert "[tune] 2 trials, at most " in tuned.stdout
    # the command the sweep prints last: the whole job on the best trial's config, stage 1 the sweep's
    best = run_dir / "tune" / "best.yaml"
    assert any(line.endswith(f": dilm-ray run {best} --resume") for line in tuned.stdout.splitlines()), tuned.stdout[-2000:]
    ran = _cli("run", str(best), "--resume", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "| learner | DPC | method |" in ran.stdout and "[pretrain] done earlier, skipped" in ran.stdout
    table = pd.read_csv(run_dir / "results" / "table.csv")
    assert {"dilm", "lm_only", "random", "k_centers", "herding"} <= set(table.method)
    # the terminal shows the stages, not Ray's forwarded worker output; the workers' own logs are kept
    assert "(RayTrainWorker" not in ran.stdout + ran.stderr and "Traceback" not in ran.stderr
    assert "INFO mlflow" not in tuned.stdout + tuned.stderr  # a fresh store: MLflow creates its tables and the experiment
    assert re.search(r"^\[distill \d+\] ", ran.stdout, re.M)  # metric lines reach the driver
    assert (run_dir / "logs" / "distill-rank0.log").is_file()
    # the run's fingerprint: a digest per stage, the sets of runs.csv, every run's score, the machine
    fingerprint = json.loads((run_dir / "results" / "fingerprint.json").read_text())
    stages, runs = fingerprint["stages"], pd.read_csv(run_dir / "results" / "runs.csv", dtype={"set_digest": str})
    assert stages["pretrain"]["weights"] and stages["distill"]["weights"] and stages["pretrain"]["weights"] != stages["distill"]["weights"]
    assert stages["distill"]["last_metrics"].startswith("[distill 15] ")
    assert {key.split("/")[0] for key in stages["sets"]} == set(table.method)
    assert len(stages["evaluate"]) == len(runs) and fingerprint["seed"] == 42 and fingerprint["machine"]["cpu"]
    assert fingerprint["config_file"] == str(best) and fingerprint["overrides"] == []  # the command that made it
