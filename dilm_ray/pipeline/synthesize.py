"""Stage 3, synthesis (DiLM Sec. 3.3): each set over-samples DPC x ``synthesize.over_sample_ratio``
per class from a generator and keeps DPC by K-centers on the learner's embeddings
(``train.synthesize``).

Three stages, one per generated method (``methods.GENERATED``):

| stage | needs | makes |
|---|---|---|
| ``synthesize_dilm`` | distill | ``distilled/dilm/dpc<D>/set<i>/`` |
| ``synthesize_dilm_filtered`` | distill | ``distilled/dilm_filtered/...``: DiLM's pools after the label-consistency filter (beyond the paper) |
| ``synthesize_lm_only`` | pretrain | ``distilled/lm_only/...``: the stage-1 generator's sets |

Keyed by the key of the stage whose generator writes them, the learner, ``synthesize`` (not
``dpc`` and ``n_datasets``: set i of DPC d is seeded by (seed, d, i)), the seed and the sampling
settings (``base.synthesize_key``).
"""

from __future__ import annotations

import json
from pathlib import Path

from dilm_ray.data import TaskSpec, TextSet, load_file
from dilm_ray.data.card import write_card
from dilm_ray.errors import GenerationError
from dilm_ray.layout import POOL_FILE
from dilm_ray.methods import GENERATED, METHODS
from dilm_ray.pipeline.base import STAGE_FILE, Context, Stage, distill_key, generator_source, preview, pretrain_key, set_files, synthesize_key
from dilm_ray.provenance import commit

KEYS = {"distill": synthesize_key(distill_key), "pretrain": synthesize_key(pretrain_key)}  # by the stage whose generator writes the sets


def synthesize_sets(ctx: Context, method: str) -> dict[int, list[Path]]:
    """Distilled sets of ``method`` (``dilm``, ``dilm_filtered`` or ``lm_only``) at every
    ``synthesize.dpc``; returns DPC -> the sets' data files.

    Each set folder keeps its over-sampled pool (``pool.jsonl``); ``dilm_filtered`` selects from
    the pools of the ``dilm`` sets when they were made with the same settings (the same rows it
    would sample), so the two methods differ only by the filter. With ``ctx.resume`` the sets
    already on disk are kept and only the missing ones are made (set i has its own seed, so it
    comes out the same); otherwise every set is made afresh. Raises ``GenerationError`` (one
    line naming the stage and DPC) when the generator cannot write a sample.
    """
    from dilm_ray.algorithm.selection import embedding_classifier
    from dilm_ray.evaluation.fidelity import label_fidelity, reference_classifier
    from dilm_ray.models.generator import build_generator
    from dilm_ray.models.learner import build_learner
    from dilm_ray.tracking.mlflow_store import log_artifacts, log_metrics
    from dilm_ray.train.embeddings import train_embeddings
    from dilm_ray.train.synthesize import MadeSet, synthesize

    cfg, layout, task = ctx.cfg, ctx.layout, ctx.data.task
    source = layout.generator(METHODS[method].generator)
    gen = build_generator(cfg.generator, task, generator_source(source))
    learner = build_learner(cfg.learner, task.num_labels, cfg.seed)
    written: dict[int, list[Path]] = {}
    previews = []
    made_by = {"method": method, "generator": f"{cfg.generator.model} -> {source.name}", "learner": cfg.learner.model, "seed": cfg.seed, "commit": commit()}
    reference = reference_classifier(ctx.data.train, cfg.seed)  # label fidelity of every set made
    label_filter, reuse_pools = None, False
    if method == "dilm_filtered":
        label_filter = embedding_classifier(train_embeddings(layout.cache, ctx.data.train, learner, cfg.precision), ctx.data.train.labels, cfg.seed)
        made_by["label_filter"] = f"logistic regression on {cfg.learner.model} embeddings of the {len(ctx.data.train)} train rows"
        dilm_marker = layout.method_dir("dilm") / STAGE_FILE
        if dilm_marker.is_file() and json.loads(dilm_marker.read_text()).get("key") == KEYS["distill"](cfg):
            reuse_pools = True
    for dpc in cfg.synthesize.dpc:
        written[dpc] = [layout.set_data(method, dpc, i) for i in range(cfg.synthesize.n_datasets)]
        todo = [i for i, path in enumerate(written[dpc]) if not (ctx.resume and path.is_file())]
        consistent: list[float] = []
        constrained: list[int] = []

        def save(made: MadeSet, dpc: int = dpc) -> None:
            folder = layout.set_dir(method, dpc, made.index)
            made.subset.save(folder)
            (folder / POOL_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in made.pool.to_records()))
            fidelity = label_fidelity(reference, [made.subset], task.num_labels).overall
            card = {**made_by, "dpc": dpc, "set_index": made.index, "rows": len(made.subset), "pool_rows": len(made.pool), "label_fidelity": round(fidelity, 4)}
            if made.consistent is not None:
                consistent.append(made.consistent / len(made.pool))
                card["label_filter_consistent"] = round(consistent[-1], 4)
            if made.constrained:
                constrained.append(made.constrained)
                card["constrained_pool_rows"] = made.constrained
            write_card(folder, task, card)

        try:
            _, dropped = synthesize(
                gen, learner, cfg.synthesize, cfg.generator, dpc, cfg.seed, indices=todo, on_set=save, precision=cfg.precision,
                label_filter=label_filter, pools=(lambda i, dpc=dpc: _load_pool(layout.set_dir("dilm", dpc, i), task)) if reuse_pools else None,
            )
        except GenerationError as err:
            raise GenerationError(f"stage synthesize_{method}, DPC {dpc}: {err}") from None
        fidelity = label_fidelity(reference, [load_file(p, task) for p in written[dpc]], task.num_labels)
        filtered = f"; the label filter judged {100 * sum(consistent) / len(consistent):.1f}% of pool rows consistent" if consistent else ""
        formatted = f", {sum(constrained)} decoded under the task's format" if constrained else ""
        print(f"{method} dpc={dpc}: {len(todo)} sets made, {len(written[dpc]) - len(todo)} kept, {dropped} malformed samples dropped and regenerated{formatted}; "
              f"label fidelity {fidelity.text()}%{filtered}")
        log_metrics(ctx.run_id, {f"synthesize.label_fidelity.{method}.dpc{dpc}": fidelity.overall})
        previews.append(preview(load_file(written[dpc][0], task), task, f"{method}, DPC {dpc}, set 0"))
    (layout.method_dir(method) / "preview.md").write_text("\n\n".join(previews) + "\n")
    log_artifacts(ctx.run_id, [layout.method_dir(method)], f"distilled/{method}")
    return written


def _load_pool(folder: Path, task: TaskSpec) -> TextSet | None:
    """The pool a generated set was selected from, or None when the folder has none."""
    return load_file(folder / POOL_FILE, task) if (folder / POOL_FILE).is_file() else None


def _stage(method: str) -> Stage:
    generator = METHODS[method].generator
    return Stage(
        name=f"synthesize_{method}",
        needs=(generator,),
        outputs=lambda ctx: [ctx.layout.method_dir(method)] if method in ctx.methods else [],
        files=lambda ctx: set_files(ctx, [method]) if method in ctx.methods else [],
        key=KEYS[generator],
        run=lambda ctx: synthesize_sets(ctx, method),
        methods=(method,),
    )


STAGES = tuple(_stage(m) for m in GENERATED)
