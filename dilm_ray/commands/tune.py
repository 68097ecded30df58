"""``dilm-ray tune``: a Ray Tune sweep over the config's ``tune.space``.

Each trial = distill (a ``TorchTrainer`` inside the trial) + synthesize + evaluate, starting
from one shared stage-1 generator. Trials report the running mean validation score after each
evaluated distilled set, so ASHA can stop weak trials early. MLflow: one parent run for the
sweep, one child run per trial (``MLflowLoggerCallback`` on the driver closes ASHA-stopped runs).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dilm_ray.config import Config, SearchSpec, apply_override, flatten
from dilm_ray.errors import UserError
from dilm_ray.layout import RunLayout


def search_space(space: dict[str, SearchSpec]) -> dict[str, Any]:
    from ray import tune

    def one(spec: SearchSpec):
        if spec.type == "grid":
            return tune.grid_search(spec.values)
        if spec.type == "choice":
            return tune.choice(spec.values)
        if spec.type == "loguniform":
            return tune.loguniform(spec.low, spec.high)
        return tune.uniform(spec.low, spec.high)

    return {key: one(spec) for key, spec in space.items()}


# Keys each trial sets for itself (trial_config), and the sweep's own section.
TRIAL_OWNED = ("name", "output_dir", "ray.storage_path", "tracking.enabled")


def trial_constants(cfg: Config) -> dict[str, Any]:
    """Every resolved config value a trial does not search or set for itself. Each trial's MLflow
    run logs them beside its searched values, so it holds its whole config; they stay out of
    Tune's ``param_space``, whose every key Tune prints in its progress lines."""
    return {k: v for k, v in flatten(cfg.to_dict()).items() if k not in cfg.tune.space and k not in TRIAL_OWNED and not k.startswith("tune.")}


def mlflow_callback(cfg: Config, parent: str):
    """``MLflowLoggerCallback`` (one child run per trial, closed by the driver even when ASHA
    stops the trial) that also logs the trial's constants."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from dilm_ray.tracking.mlflow_store import experiment_name, tracking_uri

    constants = trial_constants(cfg)

    class FullConfigCallback(MLflowLoggerCallback):
        def log_trial_start(self, trial) -> None:
            super().log_trial_start(trial)
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=constants)

    return FullConfigCallback(tracking_uri=tracking_uri(cfg), experiment_name=experiment_name(cfg), tags={"mlflow.parentRunId": parent}, save_artifact=False)


def trial_config(base: Config, params: dict[str, Any], trial_name: str) -> Config:
    """The base config with the trial's values, written into its own run folder."""
    tree = base.to_dict()
    for key, value in params.items():
        apply_override(tree, key, value)
    tree["name"] = trial_name
    tree["output_dir"] = str(RunLayout(base.run_dir).tune / "trials")
    tree["ray"]["storage_path"] = str(RunLayout(base.run_dir).tune / "train")
    tree["tracking"]["enabled"] = False  # the driver's MLflowLoggerCallback records trials
    return Config.model_validate(tree)


def run_trial(params: dict[str, Any], base_dict: dict[str, Any]) -> None:
    """One trial (runs as a Tune function trainable): stage 2 from the sweep's stage-1
    generator, stage 3, then the trial's sets evaluated one after another, reporting the
    running mean score after each set so that ASHA can stop the trial."""
    from ray import tune

    from dilm_ray.data import load_data, load_file
    from dilm_ray.evaluation.job import EvalJob, eval_key, run_job
    from dilm_ray.keys import file_digest
    from dilm_ray.seeding import setup_torch
    from dilm_ray.stages import BY_NAME, Context, synthesize_sets

    base = Config.model_validate(base_dict)
    cfg = trial_config(base, params, f"trial-{tune.get_context().get_trial_id()}")
    setup_torch(cfg)
    # every trial starts from the sweep's stage-1 generator and shares its train-embedding cache
    base_layout, layout = RunLayout(base.run_dir), RunLayout(cfg.run_dir)
    base_layout.cache.mkdir(parents=True, exist_ok=True)
    for shared, link in ((base_layout.generator_lm, layout.generator_lm), (base_layout.cache, layout.cache)):
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(shared)
    data = load_data(cfg)
    ctx = Context(cfg, data, ("dilm",))
    BY_NAME["distill"].run(ctx)
    written = synthesize_sets(ctx, "dilm")
    key = eval_key(cfg, data.task, data.validation, cfg.learner.model)
    cache: dict = {}
    scores: list[float] = []
    runs_per_set = cfg.evaluate.n_evals_per_dataset
    for index in range(cfg.synthesize.n_datasets):
        for dpc, paths in written.items():
            train = load_file(paths[index], data.task)
            for r in range(runs_per_set):
                job = EvalJob(cfg.learner.model, "dilm", dpc, index, cfg.seed + index * runs_per_set + r)
                scores.append(run_job(job, train, file_digest(paths[index]), data.validation, cfg, data.task, key, cache)["score"])
        tune.report({cfg.tune.metric: float(np.mean(scores)), "sets_evaluated": index + 1, "runs": len(scores), "run_dir": str(cfg.run_dir)})


def run_sweep(cfg: Config, resume: bool = False) -> str:
    """Run (or resume) the sweep; returns a ranked markdown table. Writes best.yaml and copies
    the best trial's distilled sets to ``<run_dir>/tune/best-distilled``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from dilm_ray.driver.ray_env import ensure_ray
    from dilm_ray.stages import Context, check_inputs, run_stages
    from dilm_ray.timing import StageTimer
    from dilm_ray.tracking.mlflow_store import log_artifacts, mlflow_run

    if not cfg.tune.space:
        raise UserError("tune.space is empty: add at least one dimension, e.g. distill.inner_loop: {type: grid, values: [5, 10]}")
    if cfg.tune.metric != "accuracy" and cfg.tune.metric != "score":
        raise UserError(f"tune.metric '{cfg.tune.metric}' is not reported by trials (use accuracy or score)")
    data = check_inputs(cfg)
    ensure_ray(cfg)
    layout = RunLayout(cfg.run_dir)
    out = layout.tune
    storage, name = out / "sweeps", f"{cfg.name}-tune"
    with mlflow_run(cfg, "tune", layout.mlflow_runs, resume) as parent:
        # one stage-1 generator shared by every trial, kept from an earlier sweep or run of this name
        run_stages(Context(cfg, data, ("lm_only",), parent, resume=True), StageTimer(layout.timing), only=("pretrain",))
        scheduler = (
            ASHAScheduler(time_attr="training_iteration", max_t=cfg.synthesize.n_datasets, grace_period=cfg.tune.grace_period)
            if cfg.tune.scheduler == "asha"
            else FIFOScheduler()
        )
        callbacks = [mlflow_callback(cfg, parent)] if parent is not None else []
        trainable = tune.with_resources(tune.with_parameters(run_trial, base_dict=cfg.to_dict()), {"cpu": cfg.tune.cpus_per_trial})
        path = storage / name
        if resume and tune.Tuner.can_restore(str(path)):
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            tuner = tune.Tuner(
                trainable,
                param_space=search_space(cfg.tune.space),
                tune_config=tune.TuneConfig(
                    metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=scheduler, num_samples=cfg.tune.num_samples,
                    max_concurrent_trials=cfg.tune.max_concurrent_trials,
                ),
                run_config=tune.RunConfig(name=name, storage_path=str(storage), callbacks=callbacks),
            )
        results = tuner.fit()
        table = ranked_table(results.get_dataframe(), list(cfg.tune.space), cfg.tune.metric, cfg.tune.mode)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "ranking.csv", index=False)
        best = results.get_best_result(cfg.tune.metric, cfg.tune.mode)
        best_cfg = trial_config(cfg, {k: best.config[k] for k in cfg.tune.space}, cfg.name)
        (out / "best.yaml").write_text(best_cfg.to_yaml())
        best_sets = out / "best-distilled"
        shutil.rmtree(best_sets, ignore_errors=True)
        shutil.copytree(RunLayout(Path(best.metrics["run_dir"])).method_dir("dilm"), best_sets)
        log_artifacts(parent, [out / "ranking.csv", out / "best.yaml"], "tune")
        log_artifacts(parent, [best_sets], "tune/best-distilled")
        if parent is not None:
            import mlflow

            mlflow.log_metric(f"best_{cfg.tune.metric}", float(best.metrics[cfg.tune.metric]))
    ray.shutdown()
    return to_markdown(table, cfg.tune.metric) + f"\n\nbest config: {out / 'best.yaml'}\nbest distilled sets: {best_sets}"


def ranked_table(df: pd.DataFrame, keys: list[str], metric: str, mode: str) -> pd.DataFrame:
    """Trials best first, with their searched values and wall time (quality per hour is the aim)."""
    cols = {f"config/{k}": k for k in keys}
    table = df[["trial_id", metric, "sets_evaluated", *cols]].rename(columns=cols)
    table.insert(3, "minutes", df["time_total_s"] / 60)
    return table.sort_values(metric, ascending=mode == "min").reset_index(drop=True)


def to_markdown(table: pd.DataFrame, metric: str) -> str:
    header = "| rank | trial | " + " | ".join(c for c in table.columns if c not in ("trial_id",)) + " |"
    lines = [header, "|" + "---|" * (len(table.columns) + 1)]
    for rank, row in enumerate(table.itertuples(index=False), 1):
        values = [f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in zip(table.columns, row) if k != "trial_id"]
        lines.append(f"| {rank} | {row.trial_id} | " + " | ".join(values) + " |")
    return "\n".join(lines)
