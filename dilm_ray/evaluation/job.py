"""The leaf of evaluation: one (learner, distilled set, seed) job, and the plan of all jobs.

A job trains a fresh learner on one set and scores it on the validation split, as DiLM's
evaluation does (Sec. 4), each set with several learner seeds. Executors (``driver.executors``) run ``run_job`` in-process or as
Ray tasks; reporting (``evaluation.report``) turns the rows into tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from dilm_ray.config import Config
from dilm_ray.data import TaskSpec, TextSet
from dilm_ray.evaluation.learners import describe, evaluate_learner, family_config
from dilm_ray.families import PROTOCOL_SECTIONS
from dilm_ray.keys import content_key

Group = tuple[str, int]  # (method, dpc)
JOB_KEY = ("learner", "method", "dpc", "set_index", "seed")  # a job's identity in a plan
ROW_KEY = (*JOB_KEY, "set_digest", "eval_key")  # a recorded row's identity: also what it was computed from


@dataclass(frozen=True)
class EvalJob:
    """One evaluation run: train ``learner`` on distilled set ``set_index`` of (``method``,
    ``dpc``) with ``seed`` (DiLM Sec. 4). ``dpc``: data (samples) per class."""

    learner: str
    method: str
    dpc: int
    set_index: int
    seed: int


def plan_jobs(groups: Mapping[Group, Sequence], runs_per_group: int, seed: int, learners: Sequence[str]) -> list[EvalJob]:
    """``runs_per_group`` jobs per (learner, group) with seeds ``seed .. seed + runs - 1``.

    A group with fewer sets (herding: 1) cycles through them so that every group gets the
    same runs with the same seeds. Groups take turns, so an interrupted evaluation leaves
    every method with about as many runs.

    ``groups``: (method, dpc) -> that group's sets (non-empty, else ZeroDivisionError).
    """
    return [
        EvalJob(learner, method, dpc, r % len(sets), seed + r)
        for learner in learners
        for r in range(runs_per_group)
        for (method, dpc), sets in groups.items()
    ]


ZERO_SHOT: Group = ("zero_shot", 0)  # icl: learners' reference: the prompt without demonstrations
FULL_DATA = "full_data"  # method of the full-data row: many real train rows, a ceiling for the sets
FAMILY_SECTIONS = PROTOCOL_SECTIONS  # ("encoder", "decoder", "scratch"), evaluate.<family>: resolved into the fields they set by family_config

# The fields a score depends on, by name: a field added to a section enters no key until it is
# listed here (``tests/test_pipeline_keys.py`` pins every shipped config's keys). Not the fields
# that only choose which runs exist (n_evals_per_dataset, baselines, learners, parallel,
# full_data_samples, full_data_seeds), nor full_data_steps (full-data runs: protocol_config).
LEARNER_FIELDS = ("model", "max_length", "pooling", "dropout", "embed_batch_size")
PROTOCOL_FIELDS = ("lr", "steps", "batch_size", "warmup_ratio", "scheduler", "weight_decay", "grad_clip", "eval_batch_size")
PROTOCOL_FIELDS_IF_SET = ("train_top_layers", "body_fraction")  # None (whole body, every layer trains): keys made before they existed
ICL_FIELDS = ("icl_shots_per_class", "icl_batch_size")  # only icl: learners read them


def plan_for_learners(
    groups: Mapping[Group, Sequence], learners: Sequence[str], n_sets: int, seeds_per_set: int, seeds: Mapping[str, int], seed: int,
    full_data_seeds: int = 1,
) -> list[EvalJob]:
    """Every learner's jobs: ``n_sets x seeds.get(learner, seeds_per_set)`` per group. A learner
    with fewer seeds per set gets a prefix of the full plan's jobs (the same sets and seeds).
    An ``icl:`` learner also gets one zero-shot job (group ``ZERO_SHOT``, deterministic), when
    ``groups`` holds that group; other learners never train on it. A ``FULL_DATA`` group (one
    set) gets ``min(full_data_seeds, seeds.get(learner))`` jobs per learner that trains
    (not ``icl:`` learners, which cannot hold a train split in their prompt)."""
    from dilm_ray.evaluation.icl import is_icl

    real = {g: sets for g, sets in groups.items() if g != ZERO_SHOT and g[0] != FULL_DATA}
    full = [g for g in groups if g[0] == FULL_DATA]
    jobs = []
    for name in learners:
        jobs += plan_jobs(real, n_sets * seeds.get(name, seeds_per_set), seed, [name])
        if is_icl(name) and ZERO_SHOT in groups:
            jobs.append(EvalJob(name, *ZERO_SHOT, 0, seed))
        if not is_icl(name):
            jobs += [EvalJob(name, *g, 0, seed + r) for g in full for r in range(min(full_data_seeds, seeds.get(name, full_data_seeds)))]
    return jobs


def protocol_config(cfg: Config, method: str) -> Config:
    """The config a job of ``method`` trains with: the full-data row trains
    ``evaluate.full_data_steps`` steps whatever the learner's family (its other settings hold),
    every other group ``evaluate.steps`` or its family's steps."""
    if method != FULL_DATA:
        return cfg
    ev = cfg.evaluate
    families = {f: getattr(ev, f).model_copy(update={"steps": None}) for f in FAMILY_SECTIONS}
    return cfg.model_copy(update={"evaluate": ev.model_copy(update={"steps": ev.full_data_steps, **families})})


def eval_key(cfg: Config, task: TaskSpec, validation: TextSet, learner: str) -> str:
    """What a job's score depends on besides its set and seed: the learner name and its
    ``LEARNER_FIELDS``, the precision of its forward passes (neural and icl: learners), the
    training protocol of its family (``evaluate`` as ``learners.family_config`` resolves it:
    ``PROTOCOL_FIELDS``, ``PROTOCOL_FIELDS_IF_SET`` when set, ``ICL_FIELDS`` for icl: learners),
    the task's metric and labels, and the validation rows themselves (not the path they came from).

    16 hex characters (``content_key``)."""
    from dilm_ray.evaluation.icl import is_icl

    cfg = family_config(cfg, learner)  # the family's protocol replaces the fields it sets
    ev, lrn = cfg.evaluate.model_dump(mode="json"), cfg.learner.model_dump(mode="json")
    protocol = {k: ev[k] for k in PROTOCOL_FIELDS}
    protocol.update({k: ev[k] for k in PROTOCOL_FIELDS_IF_SET if ev[k] is not None})
    if is_icl(learner):
        protocol.update({k: ev[k] for k in ICL_FIELDS})
    from dilm_ray.models.learner import PAIR_ENCODING_VERSION

    from dilm_ray.evaluation.learners import TFIDF
    from dilm_ray.precision import key_parts

    pairs = [PAIR_ENCODING_VERSION] if task.is_pair else []  # how the learner reads a pair (single texts: unchanged)
    precision = [] if learner == TFIDF else key_parts(cfg.precision)  # TF-IDF has no forward pass to cast
    return content_key(learner, {k: lrn[k] for k in LEARNER_FIELDS}, protocol, task.metric, task.label_names, validation.digest(), *pairs, *precision)


def run_job(job: EvalJob, train: TextSet, set_digest: str, validation: TextSet, cfg: Config, task: TaskSpec, key: str, cache: dict | None = None) -> dict:
    """Train ``job.learner`` on ``train`` with ``job.seed`` and score it on ``validation``.

    Returns one row: the job's fields, ``family``, ``set_digest`` and ``eval_key`` (what the row
    was computed from), ``accuracy``/``score`` (and ``f1`` for accuracy_f1 tasks) as fractions
    in [0, 1], and ``seconds`` of training and prediction (model loading excluded).
    """
    result = evaluate_learner(job.learner, train, validation, cfg, task, job.seed, cache)
    return {**asdict(job), "family": describe(job.learner), **result, "set_digest": set_digest, "eval_key": key}


def row_key(row: Mapping) -> tuple[str, ...]:
    """A recorded row's identity (values as text: a CSV reads them back as numbers)."""
    return tuple(str(row.get(k, "")) for k in ROW_KEY)
