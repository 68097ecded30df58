"""Stage 1: fine-tune the generator as a label-conditioned LM on the train set (DiLM Sec. 3.1)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from dilm_ray.config import GeneratorConfig, PretrainConfig
from dilm_ray.data.dataset import TextSet
from dilm_ray.models.generator import Generator
from dilm_ray.tracking.loggers import MetricLogger, NullLogger
from dilm_ray.train.loop import set_up_loop
from dilm_ray.train.runtime import Runtime
from dilm_ray.train.state import TrainState, crossed


def pretrain(
    gen: Generator,
    train: TextSet,
    cfg: PretrainConfig,
    gen_cfg: GeneratorConfig,
    seed: int,
    runtime: Runtime = Runtime(),
    logger: MetricLogger = NullLogger(),
    state: TrainState | None = None,
    on_step: Callable[[TrainState, dict[str, float]], None] | None = None,
) -> TrainState:
    """Run ``cfg.steps`` LM steps; each worker draws its batch share from its own shard.

    ``state`` resumes a checkpointed run; ``on_step`` is called after every step (checkpointing)
    with the step's metrics: empty except at log steps.

    Loss: mean ``lm_losses`` (nats/token); AdamW with ``cfg.scheduler``, gradients averaged across
    workers (``GradientSync``: bucketed all-reduces overlapping backward) and clipped to ``cfg.grad_clip``; what ``set_trainable`` chooses from ``gen_cfg``
    (LoRA adapters, the top blocks or every parameter) and the label tokens train (``set_up_loop``).
    A resumed ``state`` carries the adapters (``extra["adapter"]``). Logs ``lm_loss`` (window mean over steps
    and workers) and ``lr`` every ``cfg.log_every`` steps. Returns the state with
    ``step == cfg.steps``. DiLM Sec. 3.1.
    """
    params, optimizer, scheduler, state, rng = set_up_loop(gen, gen_cfg, cfg, runtime, state, seed=seed, rng_seed=seed + runtime.rank, label_tokens=True)
    shard = np.arange(runtime.rank, len(train), runtime.world_size)
    per_worker = max(1, cfg.batch_size // runtime.world_size)
    gen.model.train()
    bar = tqdm(range(state.step, cfg.steps), desc="pretrain", disable=not runtime.is_main, initial=state.step, total=cfg.steps)
    window, window_steps = torch.zeros((), dtype=torch.float64, device=runtime.device), 0
    with runtime.gradient_sync(params) as sync:
        for step in bar:
            batch = train.select(rng.choice(shard, size=min(per_worker, len(shard)), replace=False))
            with runtime.autocast():
                loss = gen.lm_losses(batch).mean()
            loss.backward()
            sync.finish()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # summed on the device and reduced over workers at log steps only: no host sync per step
            window += loss.detach().double()
            window_steps += 1
            metrics: dict[str, float] = {}
            if crossed(step, step + 1, cfg.log_every) or step + 1 == cfg.steps:
                metrics = {**runtime.mean_metrics({"lm_loss": window / window_steps}), "lr": scheduler.get_last_lr()[0]}
                window, window_steps = torch.zeros_like(window), 0
                logger.log(metrics, step + 1)
                bar.set_postfix(lm_loss=f"{metrics['lm_loss']:.3f}")
            state.step = step + 1
            state.rng = rng.bit_generator.state
            if on_step is not None:
                state.capture_optim(optimizer, scheduler)
                on_step(state, metrics)
    return state
