"""``dilm-ray``: every command takes a config file plus ``key=value`` overrides.

User errors print one line and exit with status 2; a sweep whose every trial failed prints one
line per trial and exits with status 1. Ctrl-C and SIGTERM end a command cleanly
(its MLflow run KILLED, finished work kept) with status 130 / 143; ``--resume`` continues.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import click

from dilm_ray import __version__, interrupts
from dilm_ray.config import Config, load_config
from dilm_ray.errors import SweepFailed, UserError
from dilm_ray.methods import CORESETS, GENERATED, METHODS


# Commands that run stages: before them, and before anything is written, ``driver.startup.startup_checks``:
# an unreachable tracking server or Ray cluster, or a store or folder that would differ between the
# nodes of a cluster, ends the command in one line.
STAGE_COMMANDS = frozenset({"pretrain", "distill", "synthesize", "coreset", "tune", "evaluate", "run"})


def _command(fn):
    """Parse CONFIG + overrides into a validated Config, run the start-up checks for
    ``STAGE_COMMANDS``; turn UserError into one line + exit 2, and an interrupt (Ctrl-C,
    SIGTERM) into one line + exit 128 + signal."""

    @click.argument("config", type=click.Path(dir_okay=False))
    @click.argument("overrides", nargs=-1)
    @functools.wraps(fn)
    def wrapper(config: str, overrides: tuple[str, ...], **kwargs):
        interrupts.install()
        from dilm_ray.driver.ray_env import QUIET_ENV

        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        try:
            cfg = load_config(config, overrides)
            if fn.__name__ in STAGE_COMMANDS:
                from dilm_ray.driver.startup import startup_checks

                startup_checks(cfg)
            from dilm_ray.seeding import setup_torch

            setup_torch(cfg)
            return fn(cfg, **kwargs)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except SweepFailed as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as err:
            name = signal.Signals(interrupts.signal_of(err)).name
            click.echo(f"interrupted ({name}): finished stages and evaluation runs are kept; add --resume to continue", err=True)
            sys.exit(interrupts.exit_code(err))

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
    from dilm_ray.data import load_data

    click.echo(cfg.to_yaml().rstrip())
    data = load_data(cfg)
    click.echo(f"# task {data.task.name}: labels {', '.join(f'{i}={n}' for i, n in enumerate(data.task.label_names))}")
    for split, part in ((cfg.data.train_split, data.train), (data.task.validation_split, data.validation)):
        counts = ", ".join(f"{n}={c}" for n, c in zip(data.task.label_names, part.counts(data.task.num_labels)))
        click.echo(f"# {split}: {len(part)} rows ({counts})")


def _one_stage(cfg: Config, stage: str, resume: bool, methods: tuple[str, ...] = ()):
    """Run one stage of ``pipeline.table.STAGES`` (always, even when done) under its own MLflow run."""
    from dilm_ray.layout import RunLayout
    from dilm_ray.pipeline.base import Context, check_inputs
    from dilm_ray.pipeline.table import run_one
    from dilm_ray.timing import StageTimer
    from dilm_ray.tracking.mlflow_store import mlflow_run

    data = check_inputs(cfg)
    layout = RunLayout(cfg.run_dir)
    with mlflow_run(cfg, stage.replace("_", "-"), layout.mlflow_runs, resume) as run_id:
        return run_one(Context(cfg, data, methods, run_id, resume), stage, StageTimer(layout.timing))


def _train_stage(cfg: Config, stage: str, resume: bool) -> None:
    label = "LM-only" if stage == "pretrain" else "DiLM"
    click.echo(f"{label} generator saved to {_one_stage(cfg, stage, resume)}")


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
@click.option("--generator", "which", type=click.Choice(GENERATED), default="dilm",
              help="which method's sets: " + "; ".join(f"{m}: {METHODS[m].description}" for m in GENERATED))
@_command
def synthesize(cfg: Config, which: str) -> None:
    """Stage 3: write distilled sets (DPC per class, K-centers over an over-sampled pool)."""
    written = _one_stage(cfg, f"synthesize_{which}", False, (which,))
    for dpc, paths in written.items():
        click.echo(f"dpc={dpc}: {len(paths)} sets under {paths[0].parents[1]}")


@main.command()
@click.option("--method", "methods", multiple=True, type=click.Choice(CORESETS), help="default: all of them")
@_command
def coreset(cfg: Config, methods: tuple[str, ...]) -> None:
    """Coreset baselines from the real train set (random, K-centers, herding on learner embeddings)."""
    written = _one_stage(cfg, "coreset", False, tuple(methods or CORESETS))
    for method, by_dpc in written.items():
        for dpc, paths in by_dpc.items():
            click.echo(f"{method} dpc={dpc}: {len(paths)} sets under {paths[0].parents[1]}")


@main.command()
@click.option("--resume", is_flag=True, help="continue an interrupted sweep with the same name")
@_command
def tune(cfg: Config, resume: bool) -> None:
    """Ray Tune sweep over tune.space: each trial distills, synthesizes and evaluates (ASHA stops weak trials)."""
    from dilm_ray.commands.tune import run_sweep

    click.echo(run_sweep(cfg, resume))


@main.command()
@click.option("--learner", "learners", multiple=True, help="learner architecture(s) to train; default: evaluate.learners or learner.model")
@click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path), help="a data file or a folder tree of them (parquet, csv, json, jsonl; one group per folder); default: the run's distilled/ folder")
@click.option("--columns", "column_specs", multiple=True, metavar="OURS=THEIRS", help="read the task's column OURS from the sets' column THEIRS, e.g. label=labels (the sets only, not the validation split)")
@click.option("--reference", "references", multiple=True, help="method (group) the p-values compare against; default: dilm if evaluated, else the first group")
@click.option("--resume", is_flag=True, help="keep the evaluation runs already in results/runs.csv and run only the others")
@_command
def evaluate(cfg: Config, learners: tuple[str, ...], data_path: Path | None, column_specs: tuple[str, ...], references: tuple[str, ...], resume: bool) -> None:
    """Train fresh learners on distilled sets and report mean/std accuracy and Welch p-values."""
    from dilm_ray.commands.run import evaluate_command

    columns = {}
    for spec in column_specs:
        ours, sep, theirs = spec.partition("=")
        if not sep or not ours or not theirs:
            raise UserError(f"--columns {spec}: expected OURS=THEIRS, e.g. label=labels")
        columns[ours] = theirs
    click.echo(evaluate_command(cfg, learners, data_path, resume, columns, references))


@main.command()
@click.option("--resume", is_flag=True, help="continue an interrupted run: skip finished stages, continue stages 1-2 from their checkpoint, keep finished evaluation runs")
@_command
def run(cfg: Config, resume: bool) -> None:
    """The whole pipeline: pretrain, distill, synthesize, coresets, evaluate; prints the final table."""
    from dilm_ray.commands.run import run_command

    click.echo(run_command(cfg, resume))


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--uri", default=None, help="backend store; default: the config's tracking.uri, MLFLOW_TRACKING_URI or sqlite:///mlflow.db here")
@click.option("--experiment", default=None, help="experiment to open; default: the config's (dilm-<task>)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True)
@click.option("--no-browser", is_flag=True, help="only print the URL")
def ui(config: str | None, uri: str | None, experiment: str | None, host: str, port: int, no_browser: bool) -> None:
    """Serve the MLflow UI and print (and open) the URL of the task's evaluation runs.

    MLflow 3.17 opens in its GenAI view; the printed URL opens the experiment's runs in the
    training view, with a saved view (an experiment tag) showing method, DPC, learner and score.
    """
    from dilm_ray.commands.ui import serve
    from dilm_ray.tracking.mlflow_store import experiment_name, tracking_uri

    try:
        cfg = load_config(config)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    sys.exit(serve(uri or tracking_uri(cfg), host, port, experiment or experiment_name(cfg), not no_browser, echo=click.echo))


if __name__ == "__main__":
    main()
