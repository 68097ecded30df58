"""The set-up both generator loops share (stage 1 ``pretrain``, stage 2 ``distill``): what
trains, its precision, AdamW and its schedule, and the loop state, fresh or resumed."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from dilm_ray.config import DistillConfig, GeneratorConfig, PretrainConfig
from dilm_ray.models.generator import Generator, set_trainable
from dilm_ray.precision import prepare
from dilm_ray.train.optim import adamw, schedule
from dilm_ray.train.runtime import Runtime
from dilm_ray.train.state import TrainState


class LoopSetup(NamedTuple):
    """What ``set_up_loop`` hands a loop, to unpack: the generator parameters that train, their
    AdamW and lr schedule (restored from a resumed state), the loop state and the numpy RNG at its ``rng``."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    scheduler: LambdaLR
    state: TrainState
    rng: np.random.Generator


def set_up_loop(
    gen: Generator,
    gen_cfg: GeneratorConfig,
    cfg: PretrainConfig | DistillConfig,
    runtime: Runtime,
    state: TrainState | None,
    *,
    seed: int,
    rng_seed: int,
    label_tokens: bool,
) -> LoopSetup:
    """Make the generator trainable as ``gen_cfg`` says (``set_trainable``; the label tokens too
    with ``label_tokens``), put it in ``runtime.precision`` on ``runtime.device`` (``prepare``)
    and build AdamW with ``cfg.lr`` / ``cfg.weight_decay`` over ``cfg.steps`` steps: stage 1's lr
    follows ``cfg.scheduler`` after ``cfg.warmup_ratio`` warmup, stage 2's is constant.

    ``seed`` draws the LoRA adapters, unoffset, so every worker starts from the same ones;
    ``rng_seed`` (the caller offsets it by rank) seeds the numpy RNG of a fresh state; a resumed
    one continues this rank's (``rank_rng_state``). A resumed
    ``state`` brings its adapters (``extra["adapter"]``), its fp32 label-token rows
    (``extra["label_rows"]``), optimizer and scheduler state dicts and RNG state. With adapters
    (label rows), the state's ``extra["adapter"]`` (``extra["label_rows"]``) is set to the current
    ones: saved with every checkpoint, as the generator folder holds them merged (rounded). Raises ValueError as
    ``set_trainable`` does.
    """
    adapter = state.extra.get("adapter") if state else None
    # frozen parameters would only cost gradient buckets and clipping work
    params = [p for p in set_trainable(gen, gen_cfg, label_tokens=label_tokens, seed=seed, adapter=adapter) if p.requires_grad]
    prepare(gen.model, runtime.precision, runtime.device)
    optimizer = adamw(params, cfg.lr, cfg.weight_decay)
    # DistillConfig has no schedule keys: stage 2 trains at a constant lr
    kind, warmup = (cfg.scheduler, cfg.warmup_ratio) if isinstance(cfg, PretrainConfig) else ("constant", 0.0)
    scheduler = schedule(optimizer, kind, cfg.steps, warmup)
    if state is not None and gen.label_rows is not None and "label_rows" in state.extra:
        # the fp32 master rows: the saved generator holds them rounded to its embedding's dtype
        # (bf16 where frozen layers are held in bf16), which would move each row by up to half a
        # bf16 step, about one AdamW step, at every resume
        with torch.no_grad():
            gen.label_rows.copy_(state.extra["label_rows"].to(gen.label_rows.device))
    resumed = state is not None
    state = state or TrainState(step=0, rng=np.random.default_rng(rng_seed).bit_generator.state)
    if gen.adapted:
        state.extra["adapter"] = gen.adapter_state()
    if gen.label_rows is not None:
        state.extra["label_rows"] = gen.label_rows.detach()  # live, as the adapters: saved with every checkpoint
    state.restore_optim(optimizer, scheduler)
    rng = np.random.default_rng()
    rng.bit_generator.state = rank_rng_state(state, runtime, rng_seed) if resumed else state.rng
    return LoopSetup(params, optimizer, scheduler, state, rng)


def rank_rng_state(state: TrainState, runtime: Runtime, rng_seed: int) -> dict[str, Any]:
    """The numpy ``bit_generator.state`` this rank continues from ``state``.

    Only rank 0 saves the state, so ``state.rng`` is rank 0's; checkpoints also carry every
    rank's in ``extra["rank_rngs"]`` (indexed by rank, gathered at each save by the Ray
    worker). This rank takes its own from there, so each worker draws after a resume what it
    would have drawn without one. Resumed with another worker count than the run that saved it,
    every rank starts a stream of its own from ``[rng_seed, state.step]`` (the shards differ
    anyway); from a checkpoint made before ``rank_rngs``, rank 0 goes on with ``state.rng`` and
    every other rank starts its own, so that no rank repeats rank 0's draws.
    """
    saved = state.extra.get("rank_rngs")
    if saved is not None and len(saved) == runtime.world_size:
        return saved[runtime.rank]
    if runtime.rank == 0 and saved is None:
        return state.rng
    return np.random.default_rng([rng_seed, state.step]).bit_generator.state
