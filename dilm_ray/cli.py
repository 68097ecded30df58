"""``dilm-ray``: every command takes a config file plus ``key=value`` overrides.

User errors print one line and exit with status 2.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import click

from dilm_ray import __version__
from dilm_ray.config import Config, load_config
from dilm_ray.errors import UserError


def _command(fn):
    """Parse CONFIG + overrides into a validated Config; turn UserError into one line + exit 2."""

    @click.argument("config", type=click.Path(dir_okay=False))
    @click.argument("overrides", nargs=-1)
    @functools.wraps(fn)
    def wrapper(config: str, overrides: tuple[str, ...], **kwargs):
        try:
            cfg = load_config(config, overrides)
            from dilm_ray.pipeline import setup_torch

            setup_torch(cfg)
            return fn(cfg, **kwargs)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dilm-ray")
def main() -> None:
    """Text-level dataset distillation with DiLM, on Ray.

    Every command takes CONFIG (a YAML file) and dotted overrides, e.g.
    dilm-ray validate configs/sst2.yaml distill.lr=3e-7
    """


@main.command()
@_command
def validate(cfg: Config) -> None:
    """Print the resolved config and the row counts of each split and label."""
    from dilm_ray.pipeline import load_data

    click.echo(cfg.to_yaml().rstrip())
    data = load_data(cfg)
    click.echo(f"# task {data.task.name}: labels {', '.join(f'{i}={n}' for i, n in enumerate(data.task.label_names))}")
    for split, part in ((cfg.data.train_split, data.train), (data.task.validation_split, data.validation)):
        counts = ", ".join(f"{n}={c}" for n, c in zip(data.task.label_names, part.counts(data.task.num_labels)))
        click.echo(f"# {split}: {len(part)} rows ({counts})")


def _train_stage(cfg: Config, stage: str, resume: bool) -> None:
    from dilm_ray.pipeline import check_inputs, distill_stage, pretrain_stage
    from dilm_ray.tracking.mlflow_store import mlflow_run

    check_inputs(cfg)
    fit, label = (pretrain_stage, "LM-only") if stage == "pretrain" else (distill_stage, "DiLM")
    with mlflow_run(cfg, stage) as run_id:
        click.echo(f"{label} generator saved to {fit(cfg, run_id, resume)}")


RESUME = click.option("--resume", is_flag=True, help="continue the run with the same name from its latest checkpoint")


@main.command()
@RESUME
@_command
def pretrain(cfg: Config, resume: bool) -> None:
    """Stage 1: fine-tune the generator as a label-conditioned LM (Ray Train)."""
    _train_stage(cfg, "pretrain", resume)


@main.command()
@RESUME
@_command
def distill(cfg: Config, resume: bool) -> None:
    """Stage 2: gradient matching on the pre-trained generator (Ray Train)."""
    _train_stage(cfg, "distill", resume)


@main.command()
@click.option("--generator", "which", type=click.Choice(["dilm", "lm_only"]), default="dilm", help="which stage's generator writes the sets")
@_command
def synthesize(cfg: Config, which: str) -> None:
    """Stage 3: write distilled sets (DPC per class, K-centers over an over-sampled pool)."""
    from dilm_ray.pipeline import load_data, synthesize_stage
    from dilm_ray.tracking.mlflow_store import mlflow_run

    data = load_data(cfg, need_validation=False)
    with mlflow_run(cfg, f"synthesize-{which}") as run_id:
        written = synthesize_stage(cfg, data, which, run_id)
    for dpc, paths in written.items():
        click.echo(f"dpc={dpc}: {len(paths)} sets under {paths[0].parents[1]}")


@main.command()
@click.option("--method", "methods", multiple=True, type=click.Choice(["random", "k_centers", "herding"]), help="default: all three")
@_command
def coreset(cfg: Config, methods: tuple[str, ...]) -> None:
    """Coreset baselines from the real train set (random, K-centers, herding on learner embeddings)."""
    from dilm_ray.pipeline import coreset_stage, load_data
    from dilm_ray.synthesis import CORESETS

    written = coreset_stage(cfg, load_data(cfg, need_validation=False), methods or CORESETS)
    for method, by_dpc in written.items():
        for dpc, paths in by_dpc.items():
            click.echo(f"{method} dpc={dpc}: {len(paths)} sets under {paths[0].parents[1]}")


@main.command()
@click.option("--resume", is_flag=True, help="continue an interrupted sweep with the same name")
@_command
def tune(cfg: Config, resume: bool) -> None:
    """Ray Tune sweep over tune.space: each trial distills, synthesizes and evaluates (ASHA stops weak trials)."""
    from dilm_ray.tune import run_sweep

    click.echo(run_sweep(cfg, resume))


@main.command()
@click.option("--learner", "learners", multiple=True, help="learner architecture(s) to train; default: evaluate.learners or learner.model")
@click.option("--data", "data_path", type=click.Path(exists=True), help="a dataset file, or a folder of <method>/dpc<D>/set<i>/train.parquet; default: the run's distilled/ folder")
@_command
def evaluate(cfg: Config, learners: tuple[str, ...], data_path: str | None) -> None:
    """Train fresh learners on distilled sets and report mean/std accuracy and Welch p-values."""
    from dilm_ray.evaluation.runner import evaluate_groups, results_table, to_markdown, write_results
    from dilm_ray.data import load_file
    from dilm_ray.pipeline import discover_sets, load_data
    from dilm_ray.tracking.mlflow_store import log_artifacts, log_evaluation_runs, mlflow_run

    data = load_data(cfg)
    source = Path(data_path) if data_path else cfg.run_dir / "distilled"
    if source.is_file():
        found = {(source.stem, 0): [source]}
    else:
        found = discover_sets(source)
        if not found:
            raise UserError(f"no distilled sets under {source} (expected <method>/dpc<D>/set<i>/train.parquet)")
    groups = {g: [load_file(p, data.task) for p in paths] for g, paths in found.items()}
    with mlflow_run(cfg, "evaluate") as run_id:
        runs = evaluate_groups(cfg, data.task, data.validation, groups, list(learners) or None)
        table = results_table(runs)
        log_artifacts(run_id, write_results(runs, table, cfg.run_dir / "results", data.task.score_name), "results")
        log_evaluation_runs(run_id, runs)
    click.echo(to_markdown(table, data.task.score_name))


@main.command()
@_command
def run(cfg: Config) -> None:
    """The whole pipeline: pretrain, distill, synthesize, coresets, evaluate; prints the final table."""
    from dilm_ray.workflow import run_pipeline

    click.echo(run_pipeline(cfg))


@main.command()
@click.option("--uri", default=None, help="backend store; default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db here")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True)
def ui(uri: str | None, host: str, port: int) -> None:
    """Serve the MLflow UI for the runs recorded here."""
    from dilm_ray.tracking.mlflow_store import tracking_uri

    store = uri or tracking_uri(Config())
    click.echo(f"MLflow UI on http://{host}:{port} (store {store})")
    sys.exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", host, "--port", str(port), "--workers", "1"]))


if __name__ == "__main__":
    main()
