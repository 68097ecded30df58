"""Stage 1, LM pre-training (DiLM Sec. 3.1): the generator fine-tuned on the labelled train rows,
one BOS token per label (Ray Train, ``train.pretrain``).

Needs nothing; makes ``generator-lm/`` (``layout.RunLayout.generator_lm``); keyed by the train
rows, the generator, ``pretrain`` (``base.pretrain_key``), the seed, the worker count and precision.
"""

from __future__ import annotations

from dilm_ray.pipeline.base import Stage, fit_generator, pretrain_key

STAGE = Stage(
    name="pretrain",
    needs=(),
    outputs=lambda ctx: [ctx.layout.generator_lm],
    files=lambda ctx: [ctx.layout.generator_lm / "config.json"],
    key=pretrain_key,
    run=lambda ctx: fit_generator(ctx, "pretrain"),
)
