"""Evaluation (DiLM Sec. 4): fresh learners trained on every distilled set, several seeds each.

Its unit is the evaluation run (learner x set x seed, ``evaluation.job.EvalJob``), not a whole
output: each finished run's row is written to ``runs.csv`` at once, so an interrupted
evaluation keeps its finished runs and a resume runs only the rest. A row is reused only if its
set (file digest) and its evaluation key (``evaluation.job.eval_key``: the learner, its training
protocol, the metric and the validation rows, field by field) are the ones the run would use now.

``dilm-ray run``, ``dilm-ray evaluate``, every ``dilm-ray tune`` trial and ``benchmarks/glue.py``
evaluate through ``evaluate_groups``: the same plan, seeds, rows and resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dilm_ray import interrupts
from dilm_ray.config import Config
from dilm_ray.data import TaskData, TaskSpec, TextSet, load_file, subsample
from dilm_ray.data.card import add_scores
from dilm_ray.driver.executors import executor
from dilm_ray.errors import UserError
from dilm_ray.evaluation.fidelity import Fidelity, group_fidelity, measured, reference_accuracy, reference_classifier
from dilm_ray.evaluation.icl import is_icl
from dilm_ray.evaluation.job import FULL_DATA, JOB_KEY, ZERO_SHOT, EvalJob, Group, eval_key, plan_for_learners, protocol_config, row_key, run_job
from dilm_ray.evaluation.report import results_table, to_markdown, write_results
from dilm_ray.keys import file_digest
from dilm_ray.layout import discover_data_files, discover_sets
from dilm_ray.pipeline.base import Context, set_files
from dilm_ray.timing import StageTimer
from dilm_ray.tracking.mlflow_store import log_evaluation_runs, log_metrics

EVALUATION_RUNS = "evaluation runs"  # the timer's count of evaluation jobs that actually ran


@dataclass(frozen=True)
class LoadedSet:
    data: TextSet
    digest: str  # SHA-256 of the file it was read from
    path: Path


Groups = dict[Group, list[LoadedSet]]


def load_groups(found: Mapping[Group, Sequence[Path]], task: TaskSpec) -> Groups:
    """Read every set file of ``found`` ((method, dpc) -> paths) with its digest."""
    return {group: [LoadedSet(load_file(p, task), file_digest(p), p) for p in paths] for group, paths in found.items()}


def sets_of(ctx: Context, dpcs: Sequence[int] | None = None) -> dict[Group, list[Path]]:
    """The config's own sets of ``ctx.methods`` (``synthesize.dpc`` or ``dpcs``), as the stages wrote them."""
    found: dict[Group, list[Path]] = {}
    for path in set_files(ctx, ctx.methods):
        method, dpc = path.parents[2].name, int(path.parents[1].name.removeprefix("dpc"))
        if dpcs is None or dpc in dpcs:
            found.setdefault((method, dpc), []).append(path)
    missing = [p for paths in found.values() for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"distilled set {missing[0]} is missing ({len(missing)} sets): run the stages that make it first")
    return found


def evaluate_groups(
    cfg: Config,
    data: TaskData,
    groups: Groups,
    runs_csv: Path,
    learners: Sequence[str] | None = None,
    seeds: Mapping[str, int] | None = None,
    resume: bool = False,
    run_id: str | None = None,
    timer: StageTimer | None = None,
    parallel: bool | None = None,
    log: Callable[[str], None] = print,
    on_run: Callable[[list[dict]], None] | None = None,
) -> pd.DataFrame:
    """Train and score every (learner, set, seed) job; returns every row of ``runs_csv``.

    Per learner, each group gets ``synthesize.n_datasets x seeds[learner]`` runs (default
    ``evaluate.n_evals_per_dataset`` seeds per set). Without ``resume`` ``runs_csv`` starts
    empty; with it, rows whose job, set digest and evaluation key match a planned job are kept
    and not run again, rows of other jobs (other learners, DPCs, sets) are kept if their
    evaluation key is the one this config gives them, and stale rows (another set, protocol or
    validation split) are dropped; planned jobs among them run again. Each
    finished job's row is appended to ``runs_csv`` and logged as an MLflow child of ``run_id``
    at once; ``timer`` counts them under ``"evaluation runs"``. With
    ``evaluate.full_data_samples`` every trainable learner also gets the full-data row
    (``full_data_group``, ``evaluate.full_data_seeds`` runs of ``evaluate.full_data_steps`` steps).
    ``on_run(rows)`` is called with every row so far (kept and new) after each new row is saved;
    ``parallel`` overrides ``evaluate.parallel`` (False: in this process, one run after another).
    Raises ``UserError`` when ``groups`` is empty.
    """
    if not groups:
        raise UserError("no distilled sets to evaluate")
    learners = list(learners or cfg.evaluate.learners or [cfg.learner.model])
    if any(is_icl(name) for name in learners):  # the zero-shot reference: no demonstrations
        empty = TextSet(data.task.text_columns, (), np.zeros(0))
        groups = {**groups, ZERO_SHOT: [LoadedSet(empty, empty.digest(), Path("-"))]}
    if cfg.evaluate.full_data_samples:
        groups = {**groups, **full_data_group(data, cfg.evaluate.full_data_samples, cfg.seed)}
    plan = plan_for_learners(
        groups, learners, cfg.synthesize.n_datasets, cfg.evaluate.n_evals_per_dataset, seeds or {}, cfg.seed, cfg.evaluate.full_data_seeds
    )
    protocols = {m: protocol_config(cfg, m) for m in {m for m, _ in groups}}
    keys: dict[tuple[str, str], str] = {}

    def key_of(learner: str, method: str) -> str:
        """The evaluation key this config gives (learner, method)'s runs, any learner or method."""
        if (learner, method) not in keys:
            keys[(learner, method)] = eval_key(protocols.get(method) or protocol_config(cfg, method), data.task, data.validation, learner)
        return keys[(learner, method)]

    def expected(job: EvalJob) -> tuple[str, ...]:
        loaded = groups[(job.method, job.dpc)][job.set_index]
        return row_key({**job.__dict__, "set_digest": loaded.digest, "eval_key": key_of(job.learner, job.method)})

    earlier = pd.read_csv(runs_csv, dtype={"set_digest": str, "eval_key": str}).to_dict("records") if resume and runs_csv.is_file() else []
    planned = {tuple(str(getattr(j, k)) for k in JOB_KEY): expected(j) for j in plan}

    def kept(row: Mapping) -> bool:
        """A planned job's row if it is the one the job would make now; another job's row if scored
        under this config's protocol and validation rows (a table never mixes two validation splits)."""
        job = tuple(str(row[k]) for k in JOB_KEY)
        return planned[job] == row_key(row) if job in planned else str(row["eval_key"]) == key_of(str(row["learner"]), str(row["method"]))

    rows = [r for r in earlier if kept(r)]
    have = {row_key(r) for r in rows}
    todo = [j for j in plan if expected(j) not in have]
    stale = len(earlier) - len(rows)
    log(f"[evaluate] {len(plan) - len(todo)} of {len(plan)} runs done earlier" + (f", {stale} stale rows dropped" if stale else ""))
    runs_csv.parent.mkdir(parents=True, exist_ok=True)
    _write_rows(rows, runs_csv)

    def save(i: int, row: dict) -> None:
        with interrupts.deferred():  # the row, its MLflow run and its count, or none of them
            rows.append(row)
            _write_rows(rows, runs_csv)
            log_evaluation_runs(run_id, [row])
            if timer is not None:
                timer.add_runs(EVALUATION_RUNS, 1)
        if on_run is not None:
            on_run(list(rows))

    calls = []
    for job in todo:
        loaded = groups[(job.method, job.dpc)][job.set_index]
        calls.append((job, loaded.data, loaded.digest, data.validation, protocols[job.method], data.task, key_of(job.learner, job.method)))
    if calls:
        executor(cfg, parallel).map(run_job, calls, save)
    return pd.DataFrame(rows)


def full_data_group(data: TaskData, samples: int, seed: int) -> Groups:
    """The full-data row's one set: ``samples`` balanced rows of the loaded train split
    (``samples // num_labels`` per label, fewer where a label has fewer rows; drawn with
    ``seed``), as group (``FULL_DATA``, rows per label)."""
    rows = subsample(data.train, samples, seed, True, data.task.num_labels)
    dpc, _ = set_dpc(rows, data.task.num_labels)
    return {(FULL_DATA, dpc): [LoadedSet(rows, rows.digest(), Path("-"))]}


def fidelity_of(groups: Groups, data: TaskData, seed: int, run_id: str | None = None, log: Callable[[str], None] = print) -> dict[Group, Fidelity]:
    """The label fidelity of every group of generated sets (``evaluation.fidelity``), logged as
    MLflow metrics ``label_fidelity.<method>.dpc<D>`` beside the reference classifier's
    validation accuracy; empty (and nothing fitted) when every group holds real rows."""
    sets = {g: [s.data for s in loaded] for g, loaded in groups.items()}
    if not any(measured(g, s) for g, s in sets.items()):
        return {}
    predict = reference_classifier(data.train, seed)
    found = group_fidelity(predict, sets, data.task.num_labels)
    ceiling = reference_accuracy(predict, data.validation)
    log(f"[label fidelity] reference classifier (TF-IDF + logistic regression on {len(data.train)} train rows): {100 * ceiling:.1f}% on the {len(data.validation)} rows scored")
    for (method, dpc), fid in sorted(found.items()):
        log(f"[label fidelity] {method} DPC {dpc}: {fid.text()}% of {fid.rows} rows")
    log_metrics(run_id, {"label_fidelity.reference_accuracy": ceiling, **{f"label_fidelity.{m}.dpc{d}": f.overall for (m, d), f in found.items()}})
    return found


def scores_to_cards(groups: Groups, runs: pd.DataFrame, task: TaskSpec, root: Path) -> None:
    """Put each set's mean score per learner into its dataset card, for the sets under ``root``
    (a run's ``distilled/``: other people's folders are not written to)."""
    if runs.empty:
        return
    for (method, dpc, index), part in runs.groupby(["method", "dpc", "set_index"]):
        sets = groups.get((method, int(dpc)))
        if not sets or int(index) >= len(sets) or not sets[int(index)].path.resolve().is_relative_to(root.resolve()):
            continue
        scores = {str(learner): {"mean": float(p.score.mean()), "runs": int(len(p))} for learner, p in part.groupby("learner")}
        add_scores(sets[int(index)].path.parent, task, scores)


def _write_rows(rows: list[dict], path: Path) -> None:
    if not rows:  # nothing finished yet: no file, rather than one without columns
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".csv.tmp")  # a kill while writing must not leave half a file
    pd.DataFrame(rows).to_csv(tmp, index=False)
    tmp.replace(path)


@dataclass(frozen=True)
class Report:
    runs: pd.DataFrame
    table: pd.DataFrame
    markdown: str
    paths: list[Path]


def evaluate_and_report(
    ctx: Context,
    timer: StageTimer,
    results: Path,
    learners: Sequence[str] | None = None,
    seeds: Mapping[str, int] | None = None,
    dpcs: Sequence[int] | None = None,
    references: Sequence[str] = ("dilm",),
    timer_name: str = "evaluate",
) -> Report:
    """The evaluation after the stages: the sets of ``ctx.methods`` x learners x seeds into
    ``results`` (``runs.csv``, ``table.{csv,md}``, ``accuracy_vs_dpc.png``); ``references``
    name the methods the table's Welch p-values compare against."""
    with timer.span(timer_name, count=False):
        groups = load_groups(sets_of(ctx, dpcs), ctx.data.task)
        runs = evaluate_groups(ctx.cfg, ctx.data, groups, results / "runs.csv", learners, seeds, ctx.resume, ctx.run_id, timer)
    table = results_table(runs, references, fidelity_of(groups, ctx.data, ctx.cfg.seed, ctx.run_id))
    paths = write_results(runs, table, results, ctx.data.task.score_name)
    scores_to_cards(groups, runs, ctx.data.task, ctx.layout.distilled)
    return Report(runs, table, to_markdown(table, ctx.data.task.score_name), paths)


def set_dpc(data: TextSet, num_labels: int) -> tuple[int, str]:
    """A set's DPC read from the set: its rows per class, and a note when classes are unequal
    (then the DPC is the mean rows per class, rounded)."""
    counts = data.counts(num_labels)
    if len(set(counts)) == 1:
        return counts[0], ""
    return max(1, round(len(data) / num_labels)), f"unequal classes ({'/'.join(map(str, counts))} rows per label)"


def load_any(source: Path, task: TaskSpec, columns: Mapping[str, str] | None = None, log: Callable[[str], None] = print) -> Groups:
    """The sets under ``source``: a file; a folder in this project's ``<method>/dpc<D>/set<i>/``
    layout; or any folder tree of data files, one group per folder (its path relative to
    ``source``), each set's DPC read from the set. ``columns`` maps the task's column names
    to the files' (``{"label": "labels"}``)."""
    if source.is_file():
        found: Mapping[str, Sequence[Path]] = {source.stem: [source]}
    else:
        own = discover_sets(source)
        if own:
            return {g: [LoadedSet(load_file(p, task, dict(columns or {})), file_digest(p), p) for p in paths] for g, paths in own.items()}
        found = discover_data_files(source)
        if not found:
            raise UserError(f"no data files (parquet, csv, json, jsonl) under {source}")
    groups: Groups = {}
    for name, paths in found.items():
        for path in paths:
            data = load_file(path, task, dict(columns or {}))
            dpc, note = set_dpc(data, task.num_labels)
            if note:
                log(f"[evaluate] {path}: {note}: reported as DPC {dpc}")
            groups.setdefault((name, dpc), []).append(LoadedSet(data, file_digest(path), path))
    for (name, dpc), sets in groups.items():
        log(f"[evaluate] {name}: {len(sets)} sets at DPC {dpc}")
    return groups


