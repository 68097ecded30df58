"""The loop of stage 3 (DiLM Sec. 3.3): sample an over-sized pool per class, keep DPC by K-centers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dilm_ray.algorithm.selection import LabelFilter, consistent_mask, label_consistent, select_per_class
from dilm_ray.config import GeneratorConfig, SynthesizeConfig
from dilm_ray.data.dataset import TextSet
from dilm_ray.models.generator import Generator
from dilm_ray.models.learner import Learner
from dilm_ray.precision import autocast, prepare


@dataclass(frozen=True)
class MadeSet:
    """One distilled set as ``synthesize`` makes it: ``subset`` (DPC rows per label) was selected
    from ``pool`` (the over-sampled generations); ``consistent`` is how many pool rows the label
    filter judged to follow their label (None without a filter); ``constrained`` how many pool
    rows were decoded under the task's format (``Generator.generate``; 0 for a reused pool)."""

    index: int
    subset: TextSet
    pool: TextSet
    consistent: int | None = None
    constrained: int = 0


def synthesize(
    gen: Generator, learner: Learner, cfg: SynthesizeConfig, gen_cfg: GeneratorConfig, dpc: int, seed: int,
    indices: Sequence[int] | None = None, progress: bool = True, on_set: Callable[[MadeSet], None] | None = None,
    precision: str = "fp32", label_filter: LabelFilter | None = None, pools: Callable[[int], TextSet | None] | None = None,
) -> tuple[list[TextSet], int]:
    """DiLM stage 3 (Sec. 3.3): sets ``indices`` (default: all ``cfg.n_datasets``): generate
    dpc x over_sample_ratio per class, keep dpc by K-centers (or at random) on learner embeddings. Each set draws from its own
    seed, so set i is the same whether or not the others are made. ``on_set(MadeSet)`` runs as each
    set is made (to save it before the next: a set can take minutes). Returns (sets, malformed
    samples dropped). Sampling and embedding run under ``precision`` (bf16: the generator, only
    sampled here, is frozen and held in bf16, its KV cache too).

    ``label_filter`` (beyond the paper): before selection, drop pool rows whose reference label
    (``argmax label_filter(embeddings)``) is not the label they were generated for
    (``algorithm.selection.label_consistent``, topped up to DPC per label). ``pools(i)`` may
    return set i's pool made earlier (the same seed and generator: the same rows) instead of
    sampling it again, so sets with and without the filter are selected from one pool.
    """
    gen.model.requires_grad_(False)
    prepare(gen.model, precision, gen.device)
    prepare(learner.model.body, precision, learner.device)
    sets, dropped = [], 0
    for i in tqdm(range(cfg.n_datasets) if indices is None else indices, desc=f"synthesize dpc={dpc}", disable=not progress):
        rng = torch.Generator().manual_seed(seed * 1_000_003 + dpc * 1009 + i)
        pool, constrained = pools(i) if pools else None, 0
        with autocast(precision, gen.device):
            if pool is None:
                pool, d, constrained = gen.generate_all(dpc * cfg.over_sample_ratio, gen_cfg, rng, cfg.max_attempts)
                dropped += d
            embeddings = learner.embed(pool)
        candidates, consistent = np.arange(len(pool)), None
        if label_filter is not None:
            labels = torch.as_tensor(pool.labels)
            proba = label_filter(embeddings)
            consistent = int(consistent_mask(labels, proba).sum())
            candidates = label_consistent(labels, proba, dpc).numpy()
        chosen = select_per_class(embeddings[torch.as_tensor(candidates)], pool.labels[candidates], dpc, cfg.select, seed=i)
        sets.append(pool.select(candidates[chosen]))
        if on_set:
            on_set(MadeSet(i, sets[-1], pool, consistent, constrained))
    return sets, dropped
