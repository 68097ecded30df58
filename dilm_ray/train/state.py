"""Resumable loop state: step, numpy RNG state and optimizer/scheduler state dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainState:
    step: int
    rng: dict[str, Any]
    optim: dict[str, Any] | None = None
    sched: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def capture_optim(self, optimizer: torch.optim.Optimizer, scheduler) -> None:
        self.optim, self.sched = optimizer.state_dict(), scheduler.state_dict()

    def restore_optim(self, optimizer: torch.optim.Optimizer, scheduler) -> None:
        if self.optim is not None:
            optimizer.load_state_dict(self.optim)
        if self.sched is not None:
            scheduler.load_state_dict(self.sched)

    def save(self, path: Path) -> None:
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path: Path) -> TrainState:
        return cls(**torch.load(path, weights_only=False))
