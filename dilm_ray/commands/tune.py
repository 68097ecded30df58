"""``dilm-ray tune``: a Ray Tune sweep over the config's ``tune.space``.

Each trial = distill (a ``TorchTrainer`` inside the trial) + synthesize through the stage table,
starting from one shared stage-1 generator, then the evaluation every command uses
(``pipeline.evaluate``). Trials report their score (``trial_metrics``) after each round of
evaluation runs, so ASHA can stop weak trials early; trials are ranked by ``tune.metric``. MLflow: one parent run for the
sweep, one child run per trial (``MLflowLoggerCallback`` on the driver closes ASHA-stopped runs).
The terminal: a line per trial event and a status line every ``STATUS_SECONDS``
(``terminal_callback``), Tune's own reporter off (``tune_terminal``). ``best.yaml`` is the whole
job's config with the best trial's values (``best_config``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dilm_ray import interrupts
from dilm_ray.config import Config, SearchSpec, apply_override, flatten, validated
from dilm_ray.errors import SweepFailed, UserError
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


def search_algorithm(cfg: Config):
    """Tune's ``BasicVariantGenerator`` over ``tune.space``: every grid combination, with the
    choice and continuous values drawn from ``random_state=cfg.seed`` (Tune's default draws from
    an unseeded generator: two sweeps of one config would try different values), at most
    ``tune.max_concurrent_trials`` trials at a time."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=cfg.tune.max_concurrent_trials, random_state=cfg.seed)


# Keys each trial sets for itself (trial_config), and the sweep's own section.
TRIAL_OWNED = ("name", "output_dir", "ray.storage_path", "tracking.enabled", "evaluate.learners", "evaluate.parallel", "evaluate.full_data_samples")
# What a trial's evaluation may be ranked by: every row has accuracy and the task's score
# (accuracy, or for QQP the mean of accuracy and F1), accuracy_f1 tasks also f1.
METRICS = ("accuracy", "score", "f1")


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
    """The base config with the trial's values, written into its own run folder; its stage-2
    checkpoints go to ``<ray.storage_path>/<name>-tune`` when the sweep sets a storage path,
    else to ``<run>/tune/train``. A trial evaluates ``learner.model`` alone, in its own process
    (Ray tasks could wait forever for CPUs the trials' Train workers hold on a small machine),
    without the full-data row: ``dilm-ray evaluate`` with its ``config.yaml`` runs the same runs."""
    tree = base.to_dict()
    for key, value in params.items():
        apply_override(tree, key, value)
    tree["name"] = trial_name
    tree["output_dir"] = str(trials_root(base))
    # trials' Train checkpoints: under the user's ray.storage_path (s3://, gs://, NFS) when set
    given = base.ray.storage_path
    tree["ray"]["storage_path"] = f"{given.rstrip('/')}/{base.name}-tune" if given else str(RunLayout(base.run_dir).tune / "train")
    tree["tracking"]["enabled"] = False  # the driver's MLflowLoggerCallback records trials
    tree["evaluate"].update(learners=[], parallel=False, full_data_samples=None)
    return validated(tree, "the trial's tune.space values")


def best_config(base: Config, params: dict[str, Any]) -> Config:
    """The sweep's config with the best trial's values (``best.yaml``): the whole job's config,
    its run folder, tracking and evaluation the sweep's own, not a trial's (``trial_config``), so
    ``dilm-ray run best.yaml --resume`` keeps the sweep's stage-1 generator."""
    tree = base.to_dict()
    for key, value in params.items():
        apply_override(tree, key, value)
    return validated(tree, "the best trial's tune.space values")


def space_configs(cfg: Config) -> list[tuple[dict[str, Any], Config]]:
    """The configs the sweep can make: every combination of the grid and choice values, and of
    the ends of the continuous ranges (``low``, ``high``). ``UserError`` (one line naming the
    values) for a combination the config refuses, e.g. ``distill.steps`` not a multiple of a
    searched ``distill.inner_loop``."""
    import itertools

    choices = {k: (spec.values if spec.type in ("grid", "choice") else [spec.low, spec.high]) for k, spec in cfg.tune.space.items()}
    made = []
    for values in itertools.islice(itertools.product(*choices.values()), 4096):  # a bound for huge spaces: the first 4096
        params = dict(zip(choices, values))
        tree = cfg.to_dict()
        for key, value in params.items():
            apply_override(tree, key, value)
        made.append((params, validated(tree, "tune.space " + ", ".join(f"{k}={v}" for k, v in params.items()))))
    return made


def check_space(cfg: Config, metric_names: tuple[str, ...]) -> None:
    """Refuse, before anything runs, a sweep that cannot work (``UserError``, one line):
    an empty space, a ``tune.metric`` that trials do not report (``metric_names``), a combination
    of searched values the config refuses, or a searched key that changes stage 1, which every
    trial shares (searching it would need a generator per trial: run separate sweeps)."""
    from dilm_ray.pipeline.base import pretrain_key

    if not cfg.tune.space:
        raise UserError("tune.space is empty: add at least one dimension, e.g. distill.inner_loop: {type: grid, values: [5, 10]}")
    if cfg.tune.metric not in metric_names:
        raise UserError(f"tune.metric '{cfg.tune.metric}' is not reported by trials of this task (use {' or '.join(metric_names)})")
    shared = pretrain_key(cfg)
    for params, trial in space_configs(cfg):
        if pretrain_key(trial) != shared:
            changed = [k for k in params if pretrain_key(trial_config(cfg, {k: params[k]}, cfg.name)) != shared]
            raise UserError(f"tune.space.{(changed or list(params))[0]} changes stage 1 (pretrain), which every trial shares: search it in separate sweeps")


def task_metrics(task_metric: str) -> tuple[str, ...]:
    """The ``METRICS`` trials of a task report: ``f1`` only for accuracy_f1 tasks (QQP)."""
    return tuple(m for m in METRICS if m != "f1" or task_metric == "accuracy_f1")


def trial_metrics(rows: list[dict], metric_names: tuple[str, ...]) -> dict[str, float]:
    """A trial's score under each of ``metric_names``: the mean over its DPCs of each DPC's mean
    over its evaluation runs (each DPC counts the same, whatever its runs)."""
    frame = pd.DataFrame(rows)
    return {m: float(frame.groupby("dpc")[m].mean().mean()) for m in metric_names if m in frame}


def run_trial(params: dict[str, Any], base_dict: dict[str, Any]) -> None:
    """One trial (runs as a Tune function trainable): stage 2 from the sweep's stage-1
    generator and stage 3, through the stage table, then the evaluation of ``dilm-ray run``
    (``pipeline.evaluate.evaluate_groups``: the same plan, seeds, ``runs.csv`` and resume) on
    its sets. It reports ``trial_metrics`` after each round of runs (one run of each DPC), so
    that ASHA can stop it. A retried trial (``ray.max_failures``) resumes its stage 2 and keeps
    its sets and finished runs."""
    from ray import tune

    from dilm_ray.data import load_data
    from dilm_ray.pipeline.base import Context
    from dilm_ray.pipeline.evaluate import load_groups, evaluate_groups, sets_of
    from dilm_ray.pipeline.table import run_stages
    from dilm_ray.seeding import setup_torch
    from dilm_ray.timing import StageTimer

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
    (layout.root / "config.yaml").write_text(cfg.to_yaml())  # `dilm-ray evaluate` with it re-runs the trial's runs
    data = load_data(cfg)
    # resume: a trial that Tune retries (tune.FailureConfig, e.g. after its node died) continues
    # its own stage 2 from the latest Train checkpoint, or skips it when done, and keeps the sets
    # and runs it made; the trial id in its name makes every folder and checkpoint its own
    ctx = Context(cfg, data, ("dilm",), resume=True)
    timer = StageTimer(layout.timing)
    run_stages(ctx, timer)
    groups = load_groups(sets_of(ctx), data.task)
    names = task_metrics(data.task.metric)
    reported = [0]

    def report(rows: list[dict]) -> None:
        if len(rows) % len(groups) == 0:  # a round of runs complete (one run per DPC); the last run completes one too
            tune.report({**trial_metrics(rows, names), "runs": len(rows), "rounds": len(rows) // len(groups), "run_dir": str(cfg.run_dir)})
            reported[0] = len(rows)

    runs = evaluate_groups(cfg, data, groups, layout.runs_csv, [cfg.learner.model], resume=True, timer=timer, parallel=False, on_run=report)
    if reported[0] != len(runs):  # every run was kept from before a retry: report them once
        report(runs.to_dict("records"))


def run_sweep(cfg: Config, resume: bool = False) -> str:
    """Run (or resume) the sweep; returns a ranked markdown table. Writes best.yaml and copies
    the best trial's distilled sets to ``<run_dir>/tune/best-distilled``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from dilm_ray.driver.ray_env import ensure_ray
    from dilm_ray.pipeline.base import Context, check_inputs
    from dilm_ray.pipeline.table import run_stages
    from dilm_ray.timing import StageTimer
    from dilm_ray.tracking.mlflow_store import log_artifacts, mlflow_run

    data = check_inputs(cfg)
    check_space(cfg, task_metrics(data.task.metric))
    ensure_ray(cfg)
    layout = RunLayout(cfg.run_dir)
    out = layout.tune
    storage, name = out / "sweeps", f"{cfg.name}-tune"
    with mlflow_run(cfg, "tune", layout.mlflow_runs, resume) as parent:
        # one stage-1 generator shared by every trial, kept from an earlier sweep or run of this name
        run_stages(Context(cfg, data, ("lm_only",), parent, resume=True), StageTimer(layout.timing), only=("pretrain",))
        rounds = cfg.synthesize.n_datasets * cfg.evaluate.n_evals_per_dataset  # a trial's reports: one per round of runs
        scheduler = (
            ASHAScheduler(time_attr="training_iteration", max_t=rounds, grace_period=cfg.tune.grace_period)
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
            for stale in (out / "ranking.csv", out / "best.yaml"):  # an earlier sweep's: never this one's result
                stale.unlink(missing_ok=True)
            for stale_dir in (out / "best-distilled", out / "trials", out / "train"):  # nor its trials, which trials resume from
                shutil.rmtree(stale_dir, ignore_errors=True)
            tuner = tune.Tuner(
                trainable,
                param_space=search_space(cfg.tune.space),
                tune_config=tune.TuneConfig(
                    metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=scheduler, num_samples=cfg.tune.num_samples,
                    search_alg=search_algorithm(cfg),  # it limits concurrency itself (Tune ignores max_concurrent_trials then)
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=str(storage), callbacks=[*callbacks, terminal_callback(cfg, rounds)],
                    verbose=0,  # Tune's own reporter off (tune_terminal): terminal_callback prints the sweep's lines
                    failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                ),
            )
        with tune_terminal(), interrupts.ctrl_c_through("Ray Tune"):  # not a finished sweep: nothing ranked
            results = tuner.fit()
        outcomes = trial_outcomes(results.experiment_path, rounds)
        table = ranked_table(outcomes, list(cfg.tune.space), cfg.tune.metric, cfg.tune.mode)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "ranking.csv", index=False)
        log_artifacts(parent, [out / "ranking.csv"], "tune")
        scored = [o for o in outcomes if o.status != "ERROR" and cfg.tune.metric in o.metrics]
        if not scored:
            ray.shutdown()
            raise SweepFailed(
                f"every trial of the sweep failed (ranking: {out / 'ranking.csv'}):\n"
                + "\n".join(f"  trial {o.trial_id}: {o.reason}" for o in outcomes)
            )
        best = next(o for o in outcomes if o.trial_id == table.iloc[0]["trial_id"])
        best_cfg = best_config(cfg, {k: best.params[k] for k in cfg.tune.space})
        (out / "best.yaml").write_text(best_cfg.to_yaml())
        best_sets = out / "best-distilled"
        shutil.rmtree(best_sets, ignore_errors=True)
        shutil.copytree(RunLayout(Path(best.metrics["run_dir"])).method_dir("dilm"), best_sets)
        log_artifacts(parent, [out / "best.yaml"], "tune")
        log_artifacts(parent, [best_sets], "tune/best-distilled")
        if parent is not None:
            import mlflow

            mlflow.log_metric(f"best_{cfg.tune.metric}", float(best.metrics[cfg.tune.metric]))
    ray.shutdown()
    failed = [o for o in outcomes if o.status == "ERROR"]
    note = f"\n\n{len(failed)} of {len(outcomes)} trials failed (listed last, with their reason)" if failed else ""
    # the same name and stage-1 settings: --resume keeps the sweep's stage-1 generator instead of training it again
    return (
        to_markdown(table) + note + f"\n\nbest config: {out / 'best.yaml'}\nbest distilled sets: {best_sets}"
        + f"\nthe whole job on it, keeping the sweep's stage 1: dilm-ray run {out / 'best.yaml'} --resume"
    )


@dataclass(frozen=True)
class TrialOutcome:
    """How one trial ended: ``status`` FINISHED (every set evaluated), STOPPED (ASHA stopped it
    after ``metrics["rounds"]`` rounds of runs) or ERROR (``reason``: the error's last line); its
    searched ``params`` and last reported ``metrics`` (empty when it never reported)."""

    trial_id: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    minutes: float
    reason: str = ""


def trial_outcomes(experiment_path: str, rounds: int) -> list[TrialOutcome]:
    """Every trial of the sweep stored at ``experiment_path`` (``ray.tune.ExperimentAnalysis``),
    failed ones included, in Tune's trial order."""
    from ray.tune import ExperimentAnalysis

    outcomes = []
    for trial in ExperimentAnalysis(experiment_path).trials:
        metrics = dict(trial.last_result or {})
        if trial.status == "ERROR":
            try:  # read from the sweep's storage (the session's staging copy may be gone)
                pickled, text = trial.get_pickled_error(), trial.get_error()
            except Exception:  # an exception class that no longer imports, an unreadable file
                pickled, text = None, None
            status, reason = "ERROR", error_reason(pickled, str(text) if text is not None else None)
        else:
            status, reason = ("FINISHED" if metrics.get("rounds", 0) >= rounds else "STOPPED"), ""
        params = {k: v for k, v in trial.config.items()}
        outcomes.append(TrialOutcome(trial.trial_id, status, params, metrics, float(metrics.get("time_total_s", 0.0)) / 60, reason))
    return outcomes


def error_reason(error: BaseException | None, trace: str | None) -> str:
    """One line on why a trial failed: a ``UserError``'s own message (``error``: Tune's pickled
    exception, unwrapped from Ray's ``RayTaskError``), else the exception line of the traceback
    ``trace`` (the last line that starts with an exception name), without its module path."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, UserError):
        return f"{type(cause).__name__}: {cause}"
    lines = [line.strip() for line in (trace or "").splitlines() if line.strip()]
    if not lines:
        return "failed (no error recorded)"
    exception_lines = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt|Failed)\b", line)]
    line = exception_lines[-1] if exception_lines else lines[-1]
    return re.sub(r"^(?:\w+\.)+(?=\w+(?:\(|:|$))", "", line)


def ranked_table(outcomes: list[TrialOutcome], keys: list[str], metric: str, mode: str) -> pd.DataFrame:
    """Every trial: scored ones best first, those with the most evaluation runs (FINISHED) ahead of
    those ASHA stopped earlier (STOPPED), then the failed ones with their reason; searched values
    and wall time (quality per hour is the aim). ``best.yaml`` is the first row's config."""
    rows = [
        {"trial_id": o.trial_id, "status": o.status, metric: o.metrics.get(metric, np.nan), "runs": o.metrics.get("runs", 0),
         "minutes": o.minutes, **{k: o.params.get(k) for k in keys}, "reason": o.reason}
        for o in outcomes
    ]
    table = pd.DataFrame(rows, columns=["trial_id", "status", metric, "runs", "minutes", *keys, "reason"])
    failed = table["status"] == "ERROR"
    # equal evidence first: a trial ASHA stopped lost at its rung to those that went on, so a
    # score from fewer runs never outranks a FINISHED trial's (most runs first, then the metric)
    scored = table[~failed].sort_values(["runs", metric], ascending=[False, mode == "min"], na_position="last")
    return pd.concat([scored, table[failed]]).reset_index(drop=True)


# A status line this often while trials run. Tune's own reporter (off: RunConfig(verbose=0))
# printed a table every 30 s: 904 of the 930 terminal lines of `tune configs/mnli-cpu.yaml`
# (2 trials, 52 min), with distill.lr 3e-06 shown as "0.".
STATUS_SECONDS = 300.0


class _DropTrialFailureLogs(logging.Filter):
    """Tune's log records of a failed trial: its full traceback ("Trial task failed for trial")
    and "Trials did not complete". The sweep says both in a line (``terminal_callback``, the
    ranking), and the traceback stays in the trial's ``error.txt``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Trial task failed for trial", "Trials did not complete"))


@contextmanager
def tune_terminal() -> Iterator[None]:
    """While the block runs, Tune's own terminal output is off: ``RAY_AIR_NEW_OUTPUT=0`` with the
    sweep's ``verbose=0`` prints nothing (Tune's newer reporter prints its experiment box and
    every trial error even at ``verbose=0``), and ``_DropTrialFailureLogs`` filters its loggers.
    ``terminal_callback`` prints the sweep's lines instead."""
    names, drop = ("ray.tune.execution.tune_controller", "ray.tune.tune"), _DropTrialFailureLogs()
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in names:
        logging.getLogger(name).addFilter(drop)
    try:
        yield
    finally:
        for name in names:
            logging.getLogger(name).removeFilter(drop)
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def trials_root(base: Config) -> Path:
    """Where the sweep of ``base`` keeps its trials' run folders (``trial_config``'s ``output_dir``)."""
    return RunLayout(base.run_dir).tune / "trials"


def trial_dir(base: Config, trial_id: str) -> Path:
    """The run folder of trial ``trial_id`` of the sweep of ``base`` (``trial_config``'s)."""
    return trials_root(base) / f"trial-{trial_id}"


def trial_activity(run_dir: Path) -> str:
    """What the trial in ``run_dir`` last did, read from its run folder (shared by every node of
    a cluster, ``startup_checks``): its evaluation runs, else its last stage-2 metric line, else ''."""
    from dilm_ray.pipeline.record import last_metric_line

    layout = RunLayout(run_dir)
    if layout.runs_csv.is_file():
        return f"evaluation, {max(0, len(layout.runs_csv.read_text().splitlines()) - 1)} runs done"
    if layout.method_dir("dilm").is_dir():
        return "synthesis"
    return last_metric_line(layout.worker_log("distill", 0), "distill") or ""


def status_line(minutes: float, trials: Sequence[Any], activity: dict[str, str]) -> str:
    """``[tune] 15.0 min: 1 running (a1_00000: [distill 30] match_loss=0.2), 1 pending, 0 done,
    0 failed``: ``trials`` are Tune's (``trial_id``, ``status``), ``activity`` what each running
    one last did (``trial_activity``)."""
    running = [t for t in trials if t.status == "RUNNING"]
    counts = {s: sum(t.status == s for t in trials) for s in ("PENDING", "TERMINATED", "ERROR")}
    shown = ", ".join(f"{t.trial_id}" + (f": {activity[t.trial_id]}" if activity.get(t.trial_id) else "") for t in running)
    return (f"[tune] {minutes:.1f} min: {len(running)} running" + (f" ({shown})" if shown else "")
            + f", {counts['PENDING']} pending, {counts['TERMINATED']} done, {counts['ERROR']} failed")


def terminal_callback(cfg: Config, rounds: int):
    """A Tune ``Callback`` on the driver that prints one line per trial event (started with its
    searched values, each round's ``tune.metric``, finished or stopped, failed with the reason)
    and a ``status_line`` every ``STATUS_SECONDS``: what a person needs to follow a sweep."""
    from ray.tune import Callback

    keys, metric = list(cfg.tune.space), cfg.tune.metric

    def say(trial, event: str) -> None:
        print(f"[tune] trial {trial.trial_id} {event}", flush=True)

    def score(result: dict) -> str:
        return f"{metric}={readable(result.get(metric))} after {result.get('runs', 0)} runs, {float(result.get('time_total_s', 0.0)) / 60:.1f} min"

    def reason(trial) -> str:
        """The error's line, from the trial's local error files (written before the callbacks
        run; storage gets them at the next sync), with where its traceback is kept."""
        import ray.cloudpickle as cloudpickle

        try:
            pickled, text = (Path(p) if p else None for p in (trial.pickled_error_file, trial.error_file))
            error = cloudpickle.loads(pickled.read_bytes()) if pickled and pickled.is_file() else None
            line = error_reason(error, text.read_text() if text and text.is_file() else None)
        except Exception:  # an exception class that does not unpickle here: the ranking gives the reason
            line = "see tune/ranking.csv at the end"
        kept = trial.run_metadata.error_filename
        return line + (f" (traceback: {Path(trial.storage.trial_fs_path, kept)})" if kept else "")

    class TrialLines(Callback):
        start = last = 0.0

        def setup(self, **info):  # each (re)start of the sweep: a restored one unpickles its callbacks
            self.start = self.last = time.monotonic()
            total, at_once = info.get("total_num_samples"), cfg.tune.max_concurrent_trials
            print(f"[tune] {total} trials, at most {at_once} at a time, scheduler {cfg.tune.scheduler}, ranked by {metric}; "
                  f"their folders: {trials_root(cfg)}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            say(trial, "started: " + " ".join(f"{k}={readable(trial.config.get(k))}" for k in keys))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            say(trial, f"round {result.get('rounds', 0)}/{rounds}: " + score(result))

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            ended = "finished" if result.get("rounds", 0) >= rounds else f"stopped by the scheduler after round {result.get('rounds', 0)}/{rounds}"
            say(trial, f"{ended}: " + score(result))

        def on_trial_recover(self, iteration, trials, trial, **info):
            say(trial, f"failed, retried (ray.max_failures): {reason(trial)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            say(trial, f"failed: {reason(trial)}")

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            if now - self.last >= STATUS_SECONDS:
                self.last = now
                activity = {t.trial_id: trial_activity(trial_dir(cfg, t.trial_id)) for t in trials if t.status == "RUNNING"}
                print(status_line((now - self.start) / 60, trials, activity), flush=True)

    return TrialLines()


def readable(value: Any) -> str:
    """A table cell: floats to 4 significant digits (1e-05 stays 1e-05, not 0.0000), NaN and None empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def to_markdown(table: pd.DataFrame) -> str:
    """The ranking as markdown: a rank for every scored trial, ``-`` for a failed one."""
    columns = [c for c in table.columns if c != "trial_id" and (c != "reason" or table["reason"].astype(bool).any())]
    lines = ["| rank | trial | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for rank, row in enumerate(table.to_dict("records"), 1):
        shown = "-" if row["status"] == "ERROR" else str(rank)
        lines.append(f"| {shown} | {row['trial_id']} | " + " | ".join(readable(row[c]).replace("|", "/") for c in columns) + " |")
    return "\n".join(lines)
