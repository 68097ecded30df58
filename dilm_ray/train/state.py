"""Resumable loop state (step, numpy RNG state, optimizer/scheduler state dicts) and the interval test on steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainState:
    """``step``: steps done; ``rng``: a numpy ``bit_generator.state``; ``optim`` / ``sched``:
    state dicts (None before the first capture); ``extra``: loop-specific values (stage 2's seconds)."""

    step: int
    rng: dict[str, Any]
    optim: dict[str, Any] | None = None
    sched: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def capture_optim(self, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """Store the optimizer's and scheduler's ``state_dict()``s."""
        self.optim, self.sched = optimizer.state_dict(), scheduler.state_dict()

    def restore_optim(self, optimizer: torch.optim.Optimizer, scheduler) -> None:
        """Load the stored state dicts into ``optimizer`` / ``scheduler``; no-op for those not captured."""
        if self.optim is not None:
            optimizer.load_state_dict(self.optim)
        if self.sched is not None:
            scheduler.load_state_dict(self.sched)

    def save(self, path: Path) -> None:
        """``torch.save`` of all fields to ``path`` (a pickle)."""
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path: Path) -> TrainState:
        """Read a ``save``d state; unpickles arbitrary objects (``weights_only=False``): trusted files only."""
        return cls(**torch.load(path, weights_only=False))


def crossed(previous: int, step: int, every: int) -> bool:
    """True when going from step ``previous`` to ``step`` reaches or passes a multiple of ``every``.

    Steps are counts of updates (``TrainState.step``), ``previous <= step``, ``every >= 1``. Why
    not ``step % every == 0``: stage 2's step advances by ``distill.inner_loop`` per outer loop,
    so with ``inner_loop`` 3 and ``every`` 5 the modulo test fires only at 15, 30, ...; this one
    fires at 6, 12, 15, 21, ..., the first step at or past each multiple. With unit steps (or
    ``inner_loop`` dividing ``every``) the two agree.
    """
    return step // every > previous // every
