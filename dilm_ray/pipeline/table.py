"""The pipeline: the stage table, and how a command plans and runs it.

``dilm-ray run``, ``dilm-ray tune``, the single-stage commands and ``benchmarks/glue.py`` plan
and run stages from ``STAGES``, the declarations of the stage modules in pipeline order. A stage
is done when its outputs exist and were made from the same inputs (``base.Stage.done``).

| stage | module | needs | outputs (``layout.RunLayout``) |
|---|---|---|---|
| ``pretrain`` | ``pipeline.pretrain`` | | ``generator-lm/`` (stage 1, Ray Train) |
| ``distill`` | ``pipeline.distill`` | pretrain | ``generator-dilm/`` (stage 2, Ray Train) |
| ``synthesize_dilm`` | ``pipeline.synthesize`` | distill | ``distilled/dilm/dpc<D>/set<i>/`` (stage 3) |
| ``synthesize_dilm_filtered`` | ``pipeline.synthesize`` | distill | ``distilled/dilm_filtered/...`` |
| ``synthesize_lm_only`` | ``pipeline.synthesize`` | pretrain | ``distilled/lm_only/...`` |
| ``coreset`` | ``pipeline.coreset`` | | ``distilled/{random,k_centers,herding}/...`` |

Evaluation (``pipeline.evaluate``) follows the table: its unit is the evaluation run, and
finished runs' rows are kept instead of whole outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dilm_ray.pipeline import coreset, distill, pretrain, synthesize
from dilm_ray.pipeline.base import Context, Stage
from dilm_ray.timing import StageTimer

STAGES: tuple[Stage, ...] = (pretrain.STAGE, distill.STAGE, *synthesize.STAGES, coreset.STAGE)
BY_NAME = {s.name: s for s in STAGES}


def _with_needs(names: Sequence[str], skip: Callable[[Stage], bool] = lambda s: False) -> set[str]:
    """``names`` and every stage they need, transitively; a stage for which ``skip`` is true is
    left out, and so are the stages only it needs."""
    chosen: set[str] = set()

    def need(stage: Stage) -> None:
        if stage.name in chosen or skip(stage):
            return
        chosen.add(stage.name)
        for dep in stage.needs:
            need(BY_NAME[dep])

    for name in names:
        need(BY_NAME[name])
    return chosen


def _targets(ctx: Context, only: Sequence[str] | None) -> list[str]:
    return list(only) if only is not None else [s.name for s in STAGES if s.wanted(ctx)]


def plan(ctx: Context, only: Sequence[str] | None = None) -> list[Stage]:
    """The stages to run, in table order: every wanted stage (one that makes sets of
    ``ctx.methods``, or one named in ``only``) and what it needs. With ``ctx.resume`` a stage
    that is done is left out, and so is a stage only needed by stages that are done: a
    generator is trained again only if a set it feeds is missing. Raises ``UserError`` when a
    done stage's outputs were made from other settings."""
    chosen = _with_needs(_targets(ctx, only), lambda s: ctx.resume and s.done(ctx))
    return [s for s in STAGES if s.name in chosen]


def run_stages(ctx: Context, timer: StageTimer, log: Callable[[str], None] = print, only: Sequence[str] | None = None) -> list[str]:
    """Run ``plan(ctx, only)``; returns the names of the stages that ran. Each stage's wall
    time and invocation count go to ``timer``; a stage that finishes writes its ``stage.json``."""
    todo = plan(ctx, only)
    relevant = _with_needs(_targets(ctx, only))
    for stage in STAGES:
        if stage not in todo and stage.name in relevant:
            log(f"[{stage.name}] done earlier, skipped" if stage.done(ctx) else f"[{stage.name}] not needed: the sets it feeds exist, skipped")
    for stage in todo:
        log(f"[{stage.name}] ...")
        run_one(ctx, stage.name, timer)
    return [s.name for s in todo]


def run_one(ctx: Context, name: str, timer: StageTimer):
    """Run stage ``name`` (even when done), timed, and mark it; returns what its run returns."""
    stage = BY_NAME[name]
    with timer.span(name):
        out = stage.run(ctx)
    stage.mark(ctx)
    return out
