"""Every shipped CPU config runs ``tune`` and ``run`` to a result on its own task, as shipped but
for data sizes, lengths and step counts (integration: the packaged models, a local Ray).

The real GLUE copy beside the checkout is used when it is there; otherwise a few rows of the
task's own columns and labels are written, so that the test runs on any clean clone.
"""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

# MNLI (pairs, three labels: the headline task) runs in the default suite; the other two take
# another ~10 min here and are marked slow (``make test-slow``)
CONFIGS = [pytest.param(p, marks=() if p.stem == "mnli-cpu" else pytest.mark.slow) for p in sorted(Path("configs").glob("*-cpu.yaml"))]
WORDS = "the a man woman dog city market film question answer river small large old new quickly".split()


def _toy_glue(out: Path, task: str) -> Path:
    """``out`` in the GLUE parquet layout of ``task``: 3 words per text, 30 train rows per label."""
    columns = {"sst2": ("sentence",), "mnli": ("premise", "hypothesis"), "qqp": ("question1", "question2")}[task]
    labels = 3 if task == "mnli" else 2
    validation = "validation_matched" if task == "mnli" else "validation"
    out.mkdir(parents=True)
    for split, n in (("train", 30 * labels), (validation, 12 * labels)):
        rows = [{**{c: " ".join(WORDS[(i * 7 + j * 3 + k) % len(WORDS)] for k in range(3)) for j, c in enumerate(columns)},
                 "label": i % labels, "idx": i} for i in range(n)]
        pd.DataFrame(rows).to_parquet(out / f"{split}.parquet")
    return out


def _data_path(config: Path, tmp_path: Path) -> str:
    shipped = yaml.safe_load(config.read_text())["data"]
    if Path(shipped["path"]).is_dir():
        return str(Path(shipped["path"]).resolve())
    return str(_toy_glue(tmp_path / "glue", shipped["task"]))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dilm_ray.cli", *args], capture_output=True, text=True, timeout=900, cwd=cwd)


@pytest.mark.integration
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_tunes_and_runs_on_its_task(config, tmp_path):
    repo = Path.cwd()
    sized = [
        f"data.path={_data_path(config, tmp_path)}", f"output_dir={tmp_path / 'runs'}", "tracking.enabled=false",
        "data.max_train_samples=60", "data.max_validation_samples=30", "data.balanced=true",
        "generator.max_length=12", "learner.max_length=16", "generator.generate_batch_size=64", "distill.learner_batch_size=4",
        "pretrain.steps=2", "pretrain.batch_size=4", "distill.steps=15", "distill.log_every=5",
        "distill.n_repset=1", "distill.repset_dpc=4", "distill.gm_real_dpc=4", "distill.gm_real_accum=1",
        "synthesize.over_sample_ratio=2", "synthesize.n_datasets=1", "evaluate.steps=2", "evaluate.eval_batch_size=32",
    ]
    tuned = _cli("tune", str(repo / config), *sized, cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    run_dir = tmp_path / "runs" / config.stem
    ranking = pd.read_csv(run_dir / "tune" / "ranking.csv")
    assert len(ranking) == 2 and set(ranking.status) == {"FINISHED"}, ranking.to_string()
    assert (run_dir / "tune" / "best.yaml").is_file()
    ran = _cli("run", str(repo / config), *sized, "--resume", cwd=tmp_path)  # stage 1 is the sweep's
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "| learner | DPC | method |" in ran.stdout and "[pretrain] done earlier, skipped" in ran.stdout
    table = pd.read_csv(run_dir / "results" / "table.csv")
    assert {"dilm", "lm_only", "random", "k_centers", "herding"} <= set(table.method)
    # the terminal shows the stages, not Ray's forwarded worker output
    assert "(RayTrainWorker" not in ran.stdout + ran.stderr and "Traceback" not in ran.stderr
    assert (run_dir / "logs" / "distill-rank0.log").is_file()
