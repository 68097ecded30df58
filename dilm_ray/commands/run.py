"""``dilm-ray run`` and ``dilm-ray evaluate``: the stage table (``pipeline.table``), then the
evaluation (``pipeline.evaluate``), under one MLflow run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dilm_ray.config import Config
from dilm_ray.data import load_data
from dilm_ray.errors import UserError
from dilm_ray.evaluation.report import results_table, to_markdown, write_results
from dilm_ray.layout import RunLayout
from dilm_ray.pipeline.base import Context, check_inputs
from dilm_ray.pipeline.evaluate import evaluate_and_report, evaluate_groups, fidelity_of, load_any, scores_to_cards
from dilm_ray.pipeline.record import write_fingerprint
from dilm_ray.pipeline.table import run_stages
from dilm_ray.provenance import commit
from dilm_ray.timing import StageTimer
from dilm_ray.tracking.mlflow_store import log_artifacts, mlflow_run

CURVES = ("pretrain.lm_loss", "distill.grad_sim", "distill.match_loss", "distill.syn_lm_loss")


def training_curves_png(run_id: str, path: Path) -> Path | None:
    """Stage 1-2 metrics recorded in MLflow, drawn as one PNG."""
    import mlflow

    from dilm_ray.evaluation.plots import training_curves

    client = mlflow.MlflowClient()
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in CURVES}
    history = {k: v for k, v in history.items() if v}
    return training_curves(history, path, "DiLM training") if history else None


def run_command(cfg: Config, resume: bool = False) -> str:
    """``dilm-ray run``: every stage, then DiLM against the configured baselines; returns the table."""
    layout = RunLayout(cfg.run_dir)
    check_inputs(cfg)
    code = commit()  # the code that runs is the code loaded now
    data = load_data(cfg)
    if not resume:
        layout.timing.unlink(missing_ok=True)
    timer = StageTimer(layout.timing)
    methods = ("dilm", *cfg.evaluate.baselines)
    with mlflow_run(cfg, "run", layout.mlflow_runs, resume) as run_id:
        ctx = Context(cfg, data, methods, run_id, resume)
        run_stages(ctx, timer)
        report = evaluate_and_report(ctx, timer, layout.results)
        (layout.results / "timing.md").write_text(timer.markdown() + "\n")
        fingerprint = write_fingerprint(cfg, layout, report.runs, layout.results, code)  # where another machine's run diverges
        log_artifacts(run_id, [*report.paths, layout.results / "timing.md", layout.timing, fingerprint], "results")
        if run_id is not None:
            import mlflow

            mlflow.log_metrics({f"seconds.{k}": v for k, v in timer.seconds.items()})
            curves = training_curves_png(run_id, layout.results / "training_curves.png")
            log_artifacts(run_id, [curves] if curves else [], "results")
    return f"{report.markdown}\n\n{timer.markdown()}"


def evaluate_command(
    cfg: Config, learners: Sequence[str] = (), data_path: Path | None = None, resume: bool = False,
    columns: Mapping[str, str] | None = None, references: Sequence[str] = (),
) -> str:
    """``dilm-ray evaluate``: every set under the run's ``distilled/`` (or ``data_path``: see
    ``load_any``) x learners x seeds; returns the table. Its p-values compare every method with
    each of ``references`` (default: ``dilm`` when evaluated, else the first group)."""
    layout = RunLayout(cfg.run_dir)
    data = load_data(cfg)
    groups = load_any(data_path or layout.distilled, data.task, columns)
    methods = sorted({m for m, _ in groups})
    unknown = [r for r in references if r not in methods]
    if unknown:
        raise UserError(f"--reference {unknown[0]}: no such method among the evaluated sets ({', '.join(methods)})")
    references = list(references) or (["dilm"] if "dilm" in methods else methods[:1])
    timer = StageTimer(layout.timing)
    with mlflow_run(cfg, "evaluate", layout.mlflow_runs, resume) as run_id:
        with timer.span("evaluate", count=False):
            runs = evaluate_groups(cfg, data, groups, layout.runs_csv, learners, None, resume, run_id, timer)
        table = results_table(runs, references, fidelity_of(groups, data, cfg.seed, run_id))
        log_artifacts(run_id, write_results(runs, table, layout.results, data.task.score_name), "results")
    scores_to_cards(groups, runs, data.task, layout.distilled)
    return to_markdown(table, data.task.score_name)
