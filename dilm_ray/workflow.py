"""``dilm-ray run``: every stage in order, one MLflow parent run, a final comparison table."""

from __future__ import annotations

from dilm_ray.config import Config
from dilm_ray.data import load_file
from dilm_ray.evaluation.runner import evaluate_groups, results_table, to_markdown, write_results
from dilm_ray.pipeline import (
    Timer,
    check_inputs,
    coreset_stage,
    discover_sets,
    distill_stage,
    load_data,
    pretrain_stage,
    synthesize_stage,
)
from dilm_ray.synthesis import CORESETS
from dilm_ray.tracking.mlflow_store import log_artifacts, log_evaluation_runs, mlflow_run


CURVES = ("pretrain.lm_loss", "distill.grad_sim", "distill.match_loss", "distill.syn_lm_loss")


def training_curves_png(run_id: str, path):
    """Stage 1-2 metrics recorded in MLflow, drawn as one PNG."""
    import mlflow

    from dilm_ray.evaluation.plots import training_curves

    client = mlflow.MlflowClient()
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in CURVES}
    history = {k: v for k, v in history.items() if v}
    return training_curves(history, path, "DiLM training") if history else None


def run_pipeline(cfg: Config) -> str:
    timer = Timer()
    check_inputs(cfg)
    data = load_data(cfg)
    with mlflow_run(cfg, "run") as run_id:
        with timer("pretrain"):
            pretrain_stage(cfg, run_id)
        with timer("distill"):
            distill_stage(cfg, run_id)
        with timer("synthesize"):
            synthesize_stage(cfg, data, "dilm", run_id)
            if "lm_only" in cfg.evaluate.baselines:
                synthesize_stage(cfg, data, "lm_only", run_id)
        with timer("coreset"):
            coreset_stage(cfg, data, tuple(m for m in CORESETS if m in cfg.evaluate.baselines))
        with timer("evaluate"):
            found = discover_sets(cfg.run_dir / "distilled")
            groups = {g: [load_file(p, data.task) for p in paths] for g, paths in found.items()}
            runs = evaluate_groups(cfg, data.task, data.validation, groups)
            table = results_table(runs)
            paths = write_results(runs, table, cfg.run_dir / "results", data.task.score_name)
            log_evaluation_runs(run_id, runs)
        timing = "\n".join(f"- {stage}: {sec:.0f} s" for stage, sec in timer.seconds.items())
        (cfg.run_dir / "results" / "timing.md").write_text(timing + "\n")
        log_artifacts(run_id, paths + [cfg.run_dir / "results" / "timing.md"], "results")
        if run_id is not None:
            import mlflow

            mlflow.log_metrics({f"seconds.{k}": v for k, v in timer.seconds.items()})
            curves = training_curves_png(run_id, cfg.run_dir / "results" / "training_curves.png")
            log_artifacts(run_id, [curves] if curves else [], "results")
    return f"{to_markdown(table, data.task.score_name)}\n\nwall time per stage:\n{timing}"
