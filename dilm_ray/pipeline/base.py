"""What every stage module builds on: ``Stage``, the run ``Context``, and the keys several stages share.

A stage's outputs are reused only when they were made from the same inputs: each output folder
holds a ``stage.json`` with the stage's *key*, a digest of the config fields its outputs depend
on. Those fields are listed here by name, section by section (``KEY_FIELDS``): a field added to
a config section enters no key until it is added to a list, so a new setting never silently
invalidates finished runs, and a setting that changes outputs must be added on purpose
(``tests/test_pipeline_keys.py`` pins every shipped config's keys). Fields that change how a
result is computed but not what (``generator.packing``: the same losses, another rounding order;
``threads``) enter no key: a run made either way resumes the other, and its fingerprint
(``pipeline.record``) shows whether the bits differ.

Stage modules (``pretrain``, ``distill``, ``synthesize``, ``coreset``, ``evaluate``) import this
module only; ``pipeline.table`` imports them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from dilm_ray.config import Config
from dilm_ray.data import TaskData, TaskSpec, TextSet, load_data
from dilm_ray.errors import UserError
from dilm_ray.evaluation.job import LEARNER_FIELDS
from dilm_ray.keys import content_key
from dilm_ray.layout import RunLayout
from dilm_ray.methods import n_sets
from dilm_ray.precision import key_parts

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
    """One stage of the pipeline, declared by its module.

    ``needs``: the stages whose outputs it reads; ``outputs``: the folders it writes (each gets a
    ``stage.json``); ``files``: the files whose existence means it is done; ``key``: the digest of
    the config fields its outputs depend on; ``run``: how it runs; ``methods``: the methods whose
    sets it makes (none for the generator stages, which are wanted only through the stages that
    need them)."""

    name: str
    needs: tuple[str, ...]
    outputs: Callable[[Context], list[Path]]
    files: Callable[[Context], list[Path]]
    key: Callable[[Config], str]
    run: Callable[[Context], object]
    methods: tuple[str, ...] = ()

    def wanted(self, ctx: Context) -> bool:
        """Whether the pipeline wants this stage's outputs for themselves: sets of ``ctx.methods``."""
        return any(m in ctx.methods for m in self.methods)

    def done(self, ctx: Context) -> bool:
        """All output files exist; raises ``UserError`` when they were made from other inputs
        (an output folder's ``stage.json`` holds another key). Outputs without a ``stage.json``
        (made before markers existed, or restored from a benchmark record) count as done."""
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
        """Write each output folder's ``stage.json`` (after the stage finished)."""
        for folder in self.outputs(ctx):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / STAGE_FILE).write_text(json.dumps({"stage": self.name, "key": self.key(ctx.cfg)}) + "\n")


# ---- keys: the config fields each stage's outputs depend on, by name ----------------------------

# Fields that enter a key in every case. Not data.path (machine-specific: the rows matter, and the
# seed picks them) nor the validation rows (stages 1-3 never read them); not the log and checkpoint
# intervals (they change no output); synthesize.dpc and n_datasets only say which sets exist
# (set i of DPC d is seeded by (seed, d, i)).
KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "data": ("task", "text_columns", "label_column", "label_names", "train_split", "max_train_samples", "balanced", "seed"),
    "generator": ("model", "max_length", "top_p", "top_k", "temperature", "train_top_layers", "generate_batch_size", "label_init", "sink_token"),
    "learner": LEARNER_FIELDS,  # the same fields as every evaluation run's key
    "pretrain": ("steps", "batch_size", "lr", "weight_decay", "warmup_ratio", "scheduler", "grad_clip"),
    "distill": (
        "steps", "inner_loop", "learner_steps", "learner_batch_size", "learner_lr", "lr", "weight_decay", "grad_clip", "n_repset",
        "repset_dpc", "gm_real_dpc", "gm_real_accum", "gm_syn_dpc", "generate_interval", "temperature", "lm_lambda", "lm_batch_size", "grad",
    ),
    "synthesize": ("over_sample_ratio", "select", "max_attempts"),
}
# Fields that enter a key only when set (not None): keys made before they existed hold.
KEY_FIELDS_IF_SET: dict[str, tuple[str, ...]] = {"generator": ("lora_rank", "lora_alpha")}
# distill.repset_pool was never read and is gone from the config; every stage-2 key made while it
# existed holds it at its only value, so it stays in the key as that constant.
REMOVED_DISTILL_FIELDS = {"repset_pool": None}


def picked(section: BaseModel, name: str) -> dict:
    """The key fields of config section ``name`` (``KEY_FIELDS``, plus ``KEY_FIELDS_IF_SET``
    when not None) as JSON values. Raises ``KeyError`` for a listed field the section lacks."""
    values = section.model_dump(mode="json")
    out = {field: values[field] for field in KEY_FIELDS[name]}
    out.update({field: values[field] for field in KEY_FIELDS_IF_SET.get(name, ()) if values[field] is not None})
    return out


def sampling_key(cfg: Config) -> tuple:
    """The sampling settings of the stages that sample (2 and 3). Constrained decoding enters
    only when it is not the default ``fallback``: a fallback run draws what earlier versions drew
    wherever their first round kept half its samples or more and they finished within
    ``max_attempts`` rounds (every recorded run: their generators kept 86% and more)."""
    mode = cfg.generator.constrained_decoding
    return () if mode == "fallback" else ({"constrained_decoding": mode},)


def pretrain_key(cfg: Config) -> str:
    """Stage 1's key: the train rows, the generator, the LM pre-training, seed, workers, precision."""
    return content_key(picked(cfg.data, "data"), picked(cfg.generator, "generator"), picked(cfg.pretrain, "pretrain"), cfg.seed, cfg.ray.num_workers, *key_parts(cfg.precision))


def distill_key(cfg: Config) -> str:
    """Stage 2's key: stage 1's, the learner, gradient matching (``distill.label_filter`` only when
    on: runs made before it existed keep their keys) and the sampling settings."""
    distill = {**picked(cfg.distill, "distill"), **REMOVED_DISTILL_FIELDS}
    if cfg.distill.label_filter:
        distill["label_filter"] = True
    return content_key(pretrain_key(cfg), picked(cfg.learner, "learner"), distill, *sampling_key(cfg))


def synthesize_key(source_key: Callable[[Config], str]) -> Callable[[Config], str]:
    """Stage 3's key from the key of the stage whose generator writes the sets."""
    return lambda cfg: content_key(source_key(cfg), picked(cfg.learner, "learner"), picked(cfg.synthesize, "synthesize"), cfg.seed, *sampling_key(cfg))


def coreset_key(cfg: Config) -> str:
    """The coresets' key: the train rows, the learner whose embeddings select them, precision."""
    return content_key(picked(cfg.data, "data"), picked(cfg.learner, "learner"), *key_parts(cfg.precision))


# ---- what several stages use ---------------------------------------------------------------------


def set_files(ctx: Context, methods: Sequence[str]) -> list[Path]:
    """The data file of every set of ``methods`` the config asks for (existing or not)."""
    layout = ctx.layout
    return [layout.set_data(m, d, i) for m in methods for d in ctx.cfg.synthesize.dpc for i in range(n_sets(m, ctx.cfg.synthesize.n_datasets))]


def generator_source(path: Path) -> str:
    """``path`` as a generator to load; ``UserError`` when it holds no checkpoint."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path} does not hold a generator checkpoint: run the earlier stage first")
    return str(path)


def preview(data: TextSet, task: TaskSpec, title: str, per_label: int = 5) -> str:
    """A few samples per label as markdown, for people browsing MLflow artifacts."""
    lines = [f"### {title}"]
    for label, name in enumerate(task.label_names):
        lines.append(f"**{name}**")
        for i in data.indices_of(label)[:per_label]:
            lines.append("- " + " ‖ ".join(t.replace("\n", " ") for t in data.texts[i]))
    return "\n".join(lines)


def check_inputs(cfg: Config) -> TaskData:
    """Load the train rows and resolve both models in the driver, so that user errors are one
    line here rather than tracebacks from inside Ray workers."""
    from transformers import AutoConfig

    from dilm_ray.models.registry import load_with_hint

    data = load_data(cfg, need_validation=False)
    load_with_hint("generator.model", cfg.generator.model, AutoConfig.from_pretrained)
    load_with_hint("learner.model", cfg.learner.model, AutoConfig.from_pretrained)
    return data


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


def fit_generator(ctx: Context, stage: str) -> Path:
    """Train the generator of ``stage`` (``pretrain`` or ``distill``) with Ray Train
    (``driver.ray_train.fit_stage``); stage 2 starts from stage 1's checkpoint. Returns the
    checkpoint folder."""
    from dilm_ray.driver.ray_train import fit_stage
    from dilm_ray.tracking.mlflow_store import tracking_uri

    check_gpu_workers(ctx.cfg, stage)
    source = None if stage == "pretrain" else generator_source(ctx.layout.generator_lm)
    uri = tracking_uri(ctx.cfg) if ctx.run_id else None
    return fit_stage(ctx.cfg, stage, source, ctx.resume, ctx.run_id, uri)
