"""The pipeline's stages in one table: name, what it needs, its outputs, whether it is done, how to run it.

``dilm-ray run``, ``dilm-ray tune`` and ``benchmarks/glue.py`` all plan and run stages from
``STAGES``. A stage is done when its outputs exist and were made from the same inputs: each
output folder holds a ``stage.json`` with the key of the config values it depends on, and a
resumed pipeline refuses (one line) to reuse an output made with other values. Outputs that
predate ``stage.json`` count as done.

| stage | needs | outputs (``layout.RunLayout``) |
|---|---|---|
| ``pretrain`` | | ``generator-lm/`` (stage 1, Ray Train) |
| ``distill`` | pretrain | ``generator-dilm/`` (stage 2, Ray Train) |
| ``synthesize_dilm`` | distill | ``distilled/dilm/dpc<D>/set<i>/`` (stage 3) |
| ``synthesize_dilm_filtered`` | distill | ``distilled/dilm_filtered/...`` (stage 3 after the label-consistency filter) |
| ``synthesize_lm_only`` | pretrain | ``distilled/lm_only/...`` (stage 3 from the stage-1 generator) |
| ``coreset`` | | ``distilled/{random,k_centers,herding}/...`` |

Evaluation is not a stage of this table: its unit is the evaluation job, and
``commands.pipeline`` keeps finished jobs' rows instead of whole outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dilm_ray.config import Config
from dilm_ray.data import TaskData, TaskSpec, TextSet, load_data, load_file
from dilm_ray.data.card import write_card
from dilm_ray.errors import GenerationError, UserError
from dilm_ray.keys import content_key
from dilm_ray.precision import key_parts
from dilm_ray.layout import CORESETS, POOL_FILE, ROWS_FILE, RunLayout
from dilm_ray.provenance import commit
from dilm_ray.timing import StageTimer
from dilm_ray.tracking.mlflow_store import log_artifacts, tracking_uri

STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class Context:
    """What a stage runs with: the config, the loaded data, the methods whose sets are wanted,
    the MLflow run to log to (None: none) and whether to continue interrupted work."""

    cfg: Config
    data: TaskData
    methods: tuple[str, ...]
    run_id: str | None = None
    resume: bool = False

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.cfg.run_dir)


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    outputs: Callable[[Context], list[Path]]  # the folders the stage writes (each gets a stage.json)
    files: Callable[[Context], list[Path]]  # the files whose existence means the stage is done
    key: Callable[[Config], str]  # digest of the config values the outputs depend on
    run: Callable[[Context], object]

    makes_sets: bool = False  # a stage whose outputs are distilled sets: a target of the pipeline

    def wanted(self, ctx: Context) -> bool:
        """Whether the pipeline wants this stage's outputs for themselves: sets of ``ctx.methods``.
        The generator stages are wanted only through the stages that need them."""
        return self.makes_sets and bool(self.outputs(ctx))

    def done(self, ctx: Context) -> bool:
        """All output files exist; raises ``UserError`` when they were made from other inputs."""
        if not all(f.is_file() for f in self.files(ctx)):
            return False
        expected = self.key(ctx.cfg)
        for folder in self.outputs(ctx):
            marker = folder / STAGE_FILE
            if marker.is_file() and json.loads(marker.read_text()).get("key") != expected:
                raise UserError(
                    f"{folder} was made from other settings than {ctx.cfg.name}'s (stage {self.name}): "
                    "run without --resume to make it again, or give the run another name"
                )
        return True

    def mark(self, ctx: Context) -> None:
        for folder in self.outputs(ctx):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / STAGE_FILE).write_text(json.dumps({"stage": self.name, "key": self.key(ctx.cfg)}) + "\n")


# ---- keys: the config values each stage's outputs depend on ---------------------------------


def _data_key(cfg: Config) -> dict:
    # not data.path (machine-specific; the rows are what matter and the seed picks them) nor the validation split
    return cfg.data.model_dump(mode="json", exclude={"path", "validation_split", "max_validation_samples", "dev_samples"})


def _generator_key(cfg: Config) -> dict:
    # the LoRA settings only when used: runs made before they existed keep their keys; how the
    # generator samples is not stage 1's business (it never samples): see _sampling_key
    lora = {k for k in ("lora_rank", "lora_alpha") if getattr(cfg.generator, k) is None}
    return cfg.generator.model_dump(mode="json", exclude={*lora, "constrained_decoding"})


def _sampling_key(cfg: Config) -> tuple:
    # constrained decoding enters the keys of the stages that sample (2 and 3) only when it is not
    # the default fallback: a fallback run draws what earlier versions drew wherever their first
    # round kept half its samples or more and they finished within max_attempts rounds (every
    # recorded run: their generators kept 86% and more); elsewhere earlier versions failed or nearly
    mode = cfg.generator.constrained_decoding
    return () if mode == "fallback" else ({"constrained_decoding": mode},)


def _pretrain_key(cfg: Config) -> str:
    return content_key(_data_key(cfg), _generator_key(cfg), cfg.pretrain.model_dump(mode="json", exclude={"log_every", "checkpoint_every"}), cfg.seed, cfg.ray.num_workers, *key_parts(cfg.precision))


def _distill_key(cfg: Config) -> str:
    # the label filter only when on: runs made before it existed keep their keys
    off = {"label_filter"} if not cfg.distill.label_filter else set()
    distill = cfg.distill.model_dump(mode="json", exclude={"log_every", "checkpoint_every", *off})
    return content_key(_pretrain_key(cfg), cfg.learner.model_dump(mode="json"), distill, *_sampling_key(cfg))


def _synthesize_key(source_key: Callable[[Config], str]) -> Callable[[Config], str]:
    # synthesize.dpc and n_datasets only say which sets exist: set i of DPC d is seeded by (seed, d, i)
    return lambda cfg: content_key(
        source_key(cfg), cfg.learner.model_dump(mode="json"), cfg.synthesize.model_dump(mode="json", exclude={"dpc", "n_datasets"}), cfg.seed, *_sampling_key(cfg)
    )


def _coreset_key(cfg: Config) -> str:
    return content_key(_data_key(cfg), cfg.learner.model_dump(mode="json"), *key_parts(cfg.precision))


# ---- outputs ----------------------------------------------------------------------------------


def n_sets(cfg: Config, method: str) -> int:
    """Sets per DPC of ``method``: herding is deterministic, so it has one."""
    return 1 if method == "herding" else cfg.synthesize.n_datasets


def set_files(ctx: Context, methods: Sequence[str]) -> list[Path]:
    """The jsonl file of every set of ``methods`` the config asks for (existing or not)."""
    layout = ctx.layout
    return [layout.set_dir(m, d, i) / "train.jsonl" for m in methods for d in ctx.cfg.synthesize.dpc for i in range(n_sets(ctx.cfg, m))]


def _coresets(ctx: Context) -> list[str]:
    return [m for m in CORESETS if m in ctx.methods]


# ---- how each stage runs ----------------------------------------------------------------------


def generator_source(path: Path) -> str:
    """``path`` as a generator to load; ``UserError`` when it holds no checkpoint."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path} does not hold a generator checkpoint: run the earlier stage first")
    return str(path)


def check_gpu_workers(cfg: Config, stage: str, visible_gpus: int | None = None) -> None:
    """Refuse (``UserError``, one line naming the keys) Train workers the embedded Ray could never
    place: ``ray.use_gpu`` with more ``ray.num_workers`` than this machine has CUDA GPUs
    (``visible_gpus``; None: ``torch.cuda.device_count()``, the GPUs this torch build can use).

    Why: Ray queues a request that no node can meet until a node that can joins; the embedded
    Ray is this machine alone, so none ever does. ``dilm-ray run configs/mnli.yaml`` as shipped
    (4 GPU workers) on a CPU machine sat at stage 1's 0% with no word until it was stopped.
    A cluster (``ray.address`` / ``RAY_ADDRESS``) is not checked: its autoscaler may add GPU
    nodes, as ``clusters/*.yaml`` do.
    """
    from dilm_ray.driver.ray_env import asked_address

    if not cfg.ray.use_gpu or asked_address(cfg) is not None:
        return
    if visible_gpus is None:
        import torch

        visible_gpus = torch.cuda.device_count()
    if visible_gpus < cfg.ray.num_workers:
        raise UserError(
            f"stage {stage}: ray.use_gpu=true with ray.num_workers={cfg.ray.num_workers} needs {cfg.ray.num_workers} GPUs, "
            f"and this machine has {visible_gpus} that torch can use: set ray.use_gpu=false, lower ray.num_workers, "
            "or connect to a GPU cluster (ray.address)"
        )


def _fit(stage: str) -> Callable[[Context], Path]:
    def run(ctx: Context) -> Path:
        from dilm_ray.driver.ray_train import fit_stage

        check_gpu_workers(ctx.cfg, stage)
        source = None if stage == "pretrain" else generator_source(ctx.layout.generator_lm)
        uri = tracking_uri(ctx.cfg) if ctx.run_id else None
        return fit_stage(ctx.cfg, stage, source, ctx.resume, ctx.run_id, uri)

    return run


GENERATOR_OF = {"dilm": "distill", "dilm_filtered": "distill", "lm_only": "pretrain"}  # the stage whose generator writes each method's sets


def synthesize_sets(ctx: Context, method: str) -> dict[int, list[Path]]:
    """Distilled sets from the DiLM generator (``method="dilm"``), the same with the
    label-consistency filter (``"dilm_filtered"``, beyond the paper) or the LM-only one (``"lm_only"``).

    Each set folder keeps its over-sampled pool (``pool.jsonl``); ``dilm_filtered`` selects from
    the pools of the ``dilm`` sets when they were made with the same settings (the same rows it
    would sample), so the two methods differ only by the filter. With ``ctx.resume`` the sets
    already on disk are kept and only the missing ones are made (set i has its own seed, so it
    comes out the same); otherwise every set is made afresh.
    """
    from dilm_ray.algorithm.selection import embedding_classifier
    from dilm_ray.evaluation.fidelity import label_fidelity, reference_classifier
    from dilm_ray.models.generator import build_generator
    from dilm_ray.models.learner import build_learner
    from dilm_ray.synthesis import MadeSet, synthesize
    from dilm_ray.tracking.mlflow_store import log_metrics
    from dilm_ray.train.embeddings import train_embeddings

    cfg, layout, task = ctx.cfg, ctx.layout, ctx.data.task
    source = layout.generator(GENERATOR_OF[method])
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
        if dilm_marker.is_file() and json.loads(dilm_marker.read_text()).get("key") == BY_NAME["synthesize_dilm"].key(cfg):
            reuse_pools = True
    for dpc in cfg.synthesize.dpc:
        written[dpc] = [layout.set_dir(method, dpc, i) / "train.jsonl" for i in range(cfg.synthesize.n_datasets)]
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


def preview(data: TextSet, task: TaskSpec, title: str, per_label: int = 5) -> str:
    """A few samples per label as markdown, for people browsing MLflow artifacts."""
    lines = [f"### {title}"]
    for label, name in enumerate(task.label_names):
        lines.append(f"**{name}**")
        for i in data.indices_of(label)[:per_label]:
            lines.append("- " + " ‖ ".join(t.replace("\n", " ") for t in data.texts[i]))
    return "\n".join(lines)


def coreset_sets(ctx: Context, methods: Sequence[str] | None = None) -> dict[str, dict[int, list[Path]]]:
    """Random and K-centers sets differ per index (seed i); herding is deterministic (one set).

    Each set folder also gets ``rows.jsonl``, the indices of its rows in the loaded train split,
    so a record can rebuild the set from the real data without keeping a copy of it.
    """
    import torch

    from dilm_ray.models.learner import build_learner
    from dilm_ray.synthesis import coreset
    from dilm_ray.train.embeddings import train_embeddings

    cfg, data, layout = ctx.cfg, ctx.data, ctx.layout
    methods = list(methods if methods is not None else _coresets(ctx))
    needs_embeddings = any(m != "random" for m in methods)
    learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed) if needs_embeddings else None
    embeddings = train_embeddings(layout.cache, data.train, learner, cfg.precision) if learner else torch.zeros(len(data.train), 1)
    written: dict[str, dict[int, list[Path]]] = {}
    made_by = {"learner": cfg.learner.model if needs_embeddings else None, "commit": commit()}
    for method in methods:
        written[method] = {}
        for dpc in cfg.synthesize.dpc:
            written[method][dpc] = []
            for i in range(n_sets(cfg, method)):
                folder = layout.set_dir(method, dpc, i)
                subset, rows = coreset(data.train, embeddings, dpc, method, seed=i)
                subset.save(folder)
                write_card(folder, data.task, {**made_by, "method": method, "dpc": dpc, "set_index": i, "seed": i, "rows": len(subset)})
                (folder / ROWS_FILE).write_text("".join(json.dumps({"row": int(r)}) + "\n" for r in rows))
                written[method][dpc].append(folder / "train.jsonl")
    return written


STAGES: tuple[Stage, ...] = (
    Stage("pretrain", (), lambda ctx: [ctx.layout.generator_lm], lambda ctx: [ctx.layout.generator_lm / "config.json"], _pretrain_key, _fit("pretrain")),
    Stage("distill", ("pretrain",), lambda ctx: [ctx.layout.generator_dilm], lambda ctx: [ctx.layout.generator_dilm / "config.json"], _distill_key, _fit("distill")),
    Stage(
        "synthesize_dilm", ("distill",),
        lambda ctx: [ctx.layout.method_dir("dilm")] if "dilm" in ctx.methods else [],
        lambda ctx: set_files(ctx, ["dilm"]) if "dilm" in ctx.methods else [],
        _synthesize_key(_distill_key), lambda ctx: synthesize_sets(ctx, "dilm"), makes_sets=True,
    ),
    Stage(
        "synthesize_dilm_filtered", ("distill",),
        lambda ctx: [ctx.layout.method_dir("dilm_filtered")] if "dilm_filtered" in ctx.methods else [],
        lambda ctx: set_files(ctx, ["dilm_filtered"]) if "dilm_filtered" in ctx.methods else [],
        _synthesize_key(_distill_key), lambda ctx: synthesize_sets(ctx, "dilm_filtered"), makes_sets=True,
    ),
    Stage(
        "synthesize_lm_only", ("pretrain",),
        lambda ctx: [ctx.layout.method_dir("lm_only")] if "lm_only" in ctx.methods else [],
        lambda ctx: set_files(ctx, ["lm_only"]) if "lm_only" in ctx.methods else [],
        _synthesize_key(_pretrain_key), lambda ctx: synthesize_sets(ctx, "lm_only"), makes_sets=True,
    ),
    Stage(
        "coreset", (),
        lambda ctx: [ctx.layout.method_dir(m) for m in _coresets(ctx)],
        lambda ctx: set_files(ctx, _coresets(ctx)),
        _coreset_key, lambda ctx: coreset_sets(ctx), makes_sets=True,
    ),
)
BY_NAME = {s.name: s for s in STAGES}


def plan(ctx: Context, only: Sequence[str] | None = None) -> list[Stage]:
    """The stages to run, in table order: every wanted stage (one with outputs for
    ``ctx.methods``, or one named in ``only``) and what it needs. With ``ctx.resume`` a stage that is done is left out,
    and so is a stage only needed by stages that are done: a generator is trained again only
    if a set it feeds is missing."""
    chosen: set[str] = set()

    def need(stage: Stage) -> None:
        if stage.name in chosen or (ctx.resume and stage.done(ctx)):
            return
        chosen.add(stage.name)
        for dep in stage.needs:
            need(BY_NAME[dep])

    targets = [BY_NAME[n] for n in only] if only is not None else [s for s in STAGES if s.wanted(ctx)]
    for stage in targets:
        need(stage)
    return [s for s in STAGES if s.name in chosen]


def run_stages(ctx: Context, timer: StageTimer, log: Callable[[str], None] = print, only: Sequence[str] | None = None) -> list[str]:
    """Run ``plan(ctx, only)``; returns the names of the stages that ran. Each stage's wall
    time and invocation count go to ``timer``; a stage that finishes writes its ``stage.json``."""
    todo = plan(ctx, only)
    relevant: set[str] = set()

    def add(stage: Stage) -> None:
        relevant.add(stage.name)
        for dep in stage.needs:
            add(BY_NAME[dep])

    for stage in STAGES:
        if stage.name in only if only is not None else stage.wanted(ctx):
            add(stage)
    for stage in STAGES:
        if stage not in todo and stage.name in relevant:
            log(f"[{stage.name}] done earlier, skipped" if stage.done(ctx) else f"[{stage.name}] not needed: the sets it feeds exist, skipped")
    for stage in todo:
        log(f"[{stage.name}] ...")
        with timer.span(stage.name):
            stage.run(ctx)
        stage.mark(ctx)
    return [s.name for s in todo]


def check_inputs(cfg: Config) -> TaskData:
    """Load the train rows and resolve both models in the driver, so that user errors are one
    line here rather than tracebacks from inside Ray workers."""
    from transformers import AutoConfig

    from dilm_ray.models.registry import load_with_hint

    data = load_data(cfg, need_validation=False)
    load_with_hint("generator.model", cfg.generator.model, AutoConfig.from_pretrained)
    load_with_hint("learner.model", cfg.learner.model, AutoConfig.from_pretrained)
    return data

