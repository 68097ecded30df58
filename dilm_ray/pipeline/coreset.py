"""The coreset baselines (DiLM Sec. 4): real train rows picked by random, K-centers or herding on
the learner's embeddings of the train rows.

Needs nothing; makes ``distilled/{random,k_centers,herding}/dpc<D>/set<i>/`` for the coresets in
``ctx.methods``, each set folder with ``rows.jsonl`` (its rows' indices in the loaded train
split); keyed by the train rows, the learner and precision (``base.coreset_key``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dilm_ray.data.card import write_card
from dilm_ray.layout import ROWS_FILE
from dilm_ray.methods import CORESETS, n_sets
from dilm_ray.pipeline.base import Context, Stage, coreset_key, set_files
from dilm_ray.provenance import commit


def wanted(ctx: Context) -> list[str]:
    """The coresets among ``ctx.methods``."""
    return [m for m in CORESETS if m in ctx.methods]


def coreset_sets(ctx: Context, methods: Sequence[str] | None = None) -> dict[str, dict[int, list[Path]]]:
    """Every set of ``methods`` (default: ``wanted(ctx)``) at every ``synthesize.dpc``: random
    and K-centers sets differ per index (seed i); herding is deterministic (one set). Returns
    method -> DPC -> the sets' data files."""
    import torch

    from dilm_ray.algorithm.selection import select_per_class
    from dilm_ray.models.learner import build_learner
    from dilm_ray.train.embeddings import train_embeddings

    cfg, data, layout = ctx.cfg, ctx.data, ctx.layout
    methods = list(methods if methods is not None else wanted(ctx))
    needs_embeddings = any(m != "random" for m in methods)
    learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed) if needs_embeddings else None
    embeddings = train_embeddings(layout.cache, data.train, learner, cfg.precision) if learner else torch.zeros(len(data.train), 1)
    written: dict[str, dict[int, list[Path]]] = {}
    made_by = {"learner": cfg.learner.model if needs_embeddings else None, "commit": commit()}
    for method in methods:
        written[method] = {}
        for dpc in cfg.synthesize.dpc:
            written[method][dpc] = []
            for i in range(n_sets(method, cfg.synthesize.n_datasets)):
                folder = layout.set_dir(method, dpc, i)
                rows = select_per_class(embeddings, data.train.labels, dpc, method, seed=i)
                subset = data.train.select(rows)
                subset.save(folder)
                write_card(folder, data.task, {**made_by, "method": method, "dpc": dpc, "set_index": i, "seed": i, "rows": len(subset)})
                (folder / ROWS_FILE).write_text("".join(json.dumps({"row": int(r)}) + "\n" for r in rows))
                written[method][dpc].append(layout.set_data(method, dpc, i))
    return written


STAGE = Stage(
    name="coreset",
    needs=(),
    outputs=lambda ctx: [ctx.layout.method_dir(m) for m in wanted(ctx)],
    files=lambda ctx: set_files(ctx, wanted(ctx)),
    key=coreset_key,
    run=coreset_sets,
    methods=CORESETS,
)
