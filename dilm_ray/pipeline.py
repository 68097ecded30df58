"""The stages as commands: each reads the config, does one stage, writes into ``<output_dir>/<name>``.

Layout of a run folder:
    generator-lm/            stage 1 checkpoint (LM-only generator)
    generator-dilm/          stage 2 checkpoint (DiLM generator)
    distilled/<method>/dpc<D>/set<i>/train.{parquet,jsonl}
    results/                 evaluation tables (csv, markdown) and plots
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dilm_ray.config import Config
from dilm_ray.data import TaskSpec, TextSet, load_file, load_split, resolve_task, subsample
from dilm_ray.errors import UserError
from dilm_ray.models.generator import build_generator
from dilm_ray.models.learner import build_learner
from dilm_ray.synthesis import CORESETS, coreset, synthesize
from dilm_ray.tracking.mlflow_store import log_artifacts

LM_DIR, DILM_DIR = "generator-lm", "generator-dilm"
CACHE_DIR = "cache"


@dataclass(frozen=True)
class TaskData:
    task: TaskSpec
    train: TextSet
    validation: TextSet


def setup_torch(cfg: Config) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)


def load_data(cfg: Config, need_validation: bool = True) -> TaskData:
    task = resolve_task(cfg.data)
    d = cfg.data
    train = subsample(load_split(d, task, d.train_split), d.max_train_samples, d.seed, d.balanced, task.num_labels)
    if need_validation:
        val = load_split(d, task, task.validation_split)
        val = subsample(val, d.max_validation_samples, d.seed, False, task.num_labels)
    else:
        val = TextSet(task.text_columns, (), np.zeros(0))
    return TaskData(task, train, val)


def check_inputs(cfg: Config) -> TaskData:
    """Load the data and resolve both models in the driver, so that user errors are one line
    here rather than tracebacks from inside Ray workers."""
    from transformers import AutoConfig

    from dilm_ray.models.registry import load_with_hint

    data = load_data(cfg, need_validation=False)
    load_with_hint("generator.model", cfg.generator.model, AutoConfig.from_pretrained)
    load_with_hint("learner.model", cfg.learner.model, AutoConfig.from_pretrained)
    return data


def pretrain_stage(cfg: Config, run_id: str | None = None, resume: bool = False) -> Path:
    """Stage 1 on Ray Train (``ray.num_workers`` workers); returns the LM-only generator folder."""
    from dilm_ray.train.ray_train import fit_stage

    return fit_stage(cfg, "pretrain", resume, run_id, tracking_uri_if(cfg, run_id))


def distill_stage(cfg: Config, run_id: str | None = None, resume: bool = False) -> Path:
    """Stage 2 on Ray Train, starting from the stage-1 generator; returns the DiLM generator folder."""
    from dilm_ray.train.ray_train import fit_stage

    generator_source(cfg, LM_DIR)  # fail early, before Ray starts
    return fit_stage(cfg, "distill", resume, run_id, tracking_uri_if(cfg, run_id))


def tracking_uri_if(cfg: Config, run_id: str | None) -> str | None:
    from dilm_ray.tracking.mlflow_store import tracking_uri

    return tracking_uri(cfg) if run_id else None


def generator_source(cfg: Config, stage_dir: str) -> str:
    path = cfg.run_dir / stage_dir
    if not (path / "config.json").is_file():
        raise UserError(f"{path} does not hold a generator checkpoint: run the earlier stage first")
    return str(path)


def set_dir(cfg: Config, method: str, dpc: int, index: int) -> Path:
    return cfg.run_dir / "distilled" / method / f"dpc{dpc}" / f"set{index}"


def synthesize_stage(cfg: Config, data: TaskData, method: str = "dilm", run_id: str | None = None, resume: bool = False) -> dict[int, list[Path]]:
    """Distilled sets from the DiLM generator (``method="dilm"``) or the LM-only one (``"lm_only"``).

    ``resume`` keeps the sets already on disk and makes only the missing ones (a benchmark adding
    a DPC or recovering from an interruption); otherwise every set is made afresh.
    """
    gen = build_generator(cfg.generator, data.task, generator_source(cfg, DILM_DIR if method == "dilm" else LM_DIR))
    learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed)
    written: dict[int, list[Path]] = {}
    previews = []
    for dpc in cfg.synthesize.dpc:
        written[dpc] = [set_dir(cfg, method, dpc, i) / "train.parquet" for i in range(cfg.synthesize.n_datasets)]
        todo = [i for i, path in enumerate(written[dpc]) if not (resume and path.is_file())]
        sets, dropped = synthesize(
            gen, learner, cfg.synthesize, cfg.generator, dpc, cfg.seed, indices=todo, on_set=lambda i, s: s.save(set_dir(cfg, method, dpc, i))
        )
        print(f"{method} dpc={dpc}: {len(sets)} sets made, {len(written[dpc]) - len(todo)} kept, {dropped} malformed samples dropped and regenerated")
        previews.append(preview(load_file(written[dpc][0], data.task), data.task, f"{method}, DPC {dpc}, set 0"))
    preview_path = cfg.run_dir / "distilled" / method / "preview.md"
    preview_path.write_text("\n\n".join(previews) + "\n")
    log_artifacts(run_id, [cfg.run_dir / "distilled" / method], f"distilled/{method}")
    return written


def preview(data: TextSet, task: TaskSpec, title: str, per_label: int = 5) -> str:
    """A few samples per label as markdown, for people browsing MLflow artifacts."""
    lines = [f"### {title}"]
    for label, name in enumerate(task.label_names):
        lines.append(f"**{name}**")
        for i in data.indices_of(label)[:per_label]:
            lines.append("- " + " ‖ ".join(t.replace("\n", " ") for t in data.texts[i]))
    return "\n".join(lines)


def train_embeddings(cfg: Config, train: TextSet, learner) -> torch.Tensor:
    """The learner's embeddings of the train rows, cached in the run folder: stage 2's teacher
    sets and the coresets use the same ones (the learner body is pretrained, so the seed does
    not change them). The key covers everything they depend on, and not the validation split."""
    data = cfg.data.model_dump(mode="json", exclude={"validation_split", "max_validation_samples"})
    key = hashlib.sha1(json.dumps([cfg.learner.model_dump(mode="json"), data], sort_keys=True).encode()).hexdigest()[:12]
    path = cfg.run_dir / CACHE_DIR / f"train-embeddings-{key}.pt"
    if path.is_file():
        return torch.load(path)
    embeddings = learner.embed(train, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # workers may race: the last rename wins, all equal
    torch.save(embeddings, tmp)
    tmp.replace(path)
    return embeddings


def coreset_stage(cfg: Config, data: TaskData, methods: tuple[str, ...] = CORESETS) -> dict[str, dict[int, list[Path]]]:
    """Random and K-centers sets differ per index (seed); herding is deterministic (one set)."""
    needs_embeddings = any(m != "random" for m in methods)
    learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed) if needs_embeddings else None
    embeddings = train_embeddings(cfg, data.train, learner) if learner else torch.zeros(len(data.train), 1)
    written: dict[str, dict[int, list[Path]]] = {}
    for method in methods:
        n_sets = 1 if method == "herding" else cfg.synthesize.n_datasets
        written[method] = {
            dpc: [coreset(data.train, embeddings, dpc, method, seed=i).save(set_dir(cfg, method, dpc, i))[0] for i in range(n_sets)]
            for dpc in cfg.synthesize.dpc
        }
    return written


def discover_sets(root: Path) -> dict[tuple[str, int], list[Path]]:
    """``distilled/<method>/dpc<D>/set<i>/train.parquet`` files grouped by (method, dpc)."""
    found: dict[tuple[str, int], list[Path]] = {}
    for path in sorted(root.glob("*/dpc*/set*/train.parquet")):
        method, dpc = path.parents[2].name, int(path.parents[1].name.removeprefix("dpc"))
        found.setdefault((method, dpc), []).append(path)
    return found


class Timer:
    """Wall time per stage, for the closing table."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Span()
