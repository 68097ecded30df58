"""Where a training loop runs: rank, world size, device, and collectives that are no-ops alone.

The same loop runs in a single process (``Runtime()``) and in each Ray Train worker
(``Runtime.from_environment()`` once torch.distributed is initialised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist

from dilm_ray import precision as _precision


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """This worker's ``rank`` in [0, ``world_size``), ``device`` and ``precision`` (``bf16`` or
    ``fp32``, see ``dilm_ray.precision``); collectives are no-ops when alone.

    With ``world_size > 1`` every worker must make the same collective calls in the same order.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"

    def autocast(self):
        """The context forward passes run in: bf16 autocast on this device, or a no-op for fp32."""
        return _precision.autocast(self.precision, self.device)

    @property
    def is_main(self) -> bool:
        """Rank 0: the worker that shows progress bars."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, precision: str = "fp32") -> Runtime:
        """From torch.distributed when initialised (device from Ray Train if inside a worker), else
        a single process on ``default_device()``; ``precision`` as given."""
        if dist.is_available() and dist.is_initialized():
            try:
                import ray.train.torch

                device = ray.train.torch.get_device()
            except Exception:  # outside a Ray Train worker
                device = default_device()
            return cls(dist.get_rank(), dist.get_world_size(), device, precision)
        return cls(device=default_device(), precision=precision)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each ``p.grad`` in place by its mean over workers (all-reduce); None grads are skipped."""
        if self.world_size == 1:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.world_size

    def mean(self, value: float) -> float:
        """The mean of ``value`` over workers (float64 all-reduce); ``value`` itself when alone."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world_size
