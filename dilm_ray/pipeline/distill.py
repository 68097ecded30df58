"""Stage 2, gradient matching (DiLM Sec. 3.2): the stage-1 generator trained so that the learner's
gradient on its samples matches the gradient on real teacher sets (Ray Train, ``train.distill``).

Needs ``pretrain``; makes ``generator-dilm/``; keyed by stage 1's key, the learner, ``distill``
and the sampling settings (``base.distill_key``).
"""

from __future__ import annotations

from dilm_ray.pipeline.base import Stage, distill_key, fit_generator

STAGE = Stage(
    name="distill",
    needs=("pretrain",),
    outputs=lambda ctx: [ctx.layout.generator_dilm],
    files=lambda ctx: [ctx.layout.generator_dilm / "config.json"],
    key=distill_key,
    run=lambda ctx: fit_generator(ctx, "distill"),
)
