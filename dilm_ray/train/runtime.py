"""Where a training loop runs: rank, world size, device, and collectives that are no-ops alone.

The same loop runs in a single process (``Runtime()``) and in each Ray Train worker
(``Runtime.from_environment()`` once torch.distributed is initialised). Every tensor a
collective sees lives on ``Runtime.device``: NCCL (``ray.use_gpu``) rejects CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from dilm_ray import precision as _precision

# DDP's default bucket size: large enough that a step needs a handful of calls (a full GPT-2
# has 148 gradient tensors, 0.5 GB in fp32), small enough that the first bucket is ready, and
# its all-reduce under way, while backward still runs through the lower layers.
BUCKET_BYTES = 25 * 2**20


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, async_op: bool = False) -> Any:
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=async_op)


@dataclass(frozen=True)
class Runtime:
    """This worker's ``rank`` in [0, ``world_size``), ``device`` and ``precision`` (``bf16`` or
    ``fp32``, see ``dilm_ray.precision``); collectives are no-ops when alone.

    ``all_reduce(tensor, async_op=False)`` sums ``tensor`` in place over workers and returns
    None, or a handle with ``wait()`` when ``async_op``: ``torch.distributed.all_reduce`` by
    default; tests pass a recording one. With ``world_size > 1`` every worker must make the same
    collective calls in the same order.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    all_reduce: Callable[..., Any] = field(default=_all_reduce, repr=False, compare=False)

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

    def gradient_sync(self, params: Sequence[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> GradientSync:
        """A ``GradientSync`` of ``params`` over this runtime's workers (a no-op alone)."""
        return GradientSync(params, self, bucket_bytes)

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every worker, indexed by rank (``torch.distributed.all_gather_object``:
        pickled, so any picklable value); ``[obj]`` alone. Every worker must call it."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean_metrics(self, values: dict[str, float | torch.Tensor]) -> dict[str, float]:
        """Each value's mean over workers, as Python floats: one float64 all-reduce of them all,
        on ``device``, and one transfer to the host. Values: floats or 0-dim tensors (any
        device and dtype). Every worker must pass the same keys; they are reduced in sorted order.
        """
        keys = sorted(values)
        if not keys:
            return {}
        t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(self.device) for k in keys])
        if self.world_size > 1:
            self.all_reduce(t)
            t = t / self.world_size
        return dict(zip(keys, t.tolist()))


class _Bucket:
    """Parameters whose gradients are all-reduced as one flat tensor: their gradient elements,
    then one presence flag per parameter (1 where this worker has a gradient)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.size = sum(self.sizes)
        self.ready = 0
        self.work: Any = None
        self.flat: torch.Tensor | None = None
        self.complete = True  # this worker had a gradient for every parameter


class GradientSync:
    """Average the gradients of ``params`` over workers with a few bucketed all-reduces, each
    started as soon as backward has produced its gradients (DDP's overlap, without wrapping the
    model: ``Generator.lm_losses`` calls the body and head directly, and ranks run different
    numbers of forward passes when they regenerate samples).

    Parameters are grouped, in reverse order (backward reaches the last layers first), into
    buckets of at most ``bucket_bytes`` per dtype and device. A post-accumulate-grad hook counts
    each parameter's gradient; a complete bucket is flattened and its all-reduce started
    (``async_op``), in bucket order so that every worker issues the same calls in the same
    order. ``finish()`` starts the rest (parameters without a gradient this step contribute
    zeros), waits, and writes each mean back into ``p.grad``: the sum over workers divided by
    ``world_size``, element by element what a per-tensor all-reduce gives. A parameter that no
    worker has a gradient for keeps ``grad`` None; one that only some workers have gets the mean
    on all. Call ``finish()`` after every backward and before clipping or the optimizer step;
    one backward per step (the hooks count accumulations). ``world_size == 1``: no hooks, and
    ``finish()`` does nothing. Use it as a context manager, which removes the hooks on exit.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], runtime: Runtime, bucket_bytes: int = BUCKET_BYTES):
        self.runtime = runtime
        self.buckets: list[_Bucket] = []
        self.handles: list[Any] = []
        self.started = 0
        if runtime.world_size == 1:
            return
        open_buckets: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
        open_bytes: dict[tuple[torch.dtype, torch.device], int] = {}
        unique = list({id(p): p for p in params if p.requires_grad}.values())
        self.bucket_of: dict[int, _Bucket] = {}
        for p in reversed(unique):
            key, nbytes = (p.dtype, p.device), p.numel() * p.element_size()
            if open_buckets.get(key) and open_bytes[key] + nbytes > bucket_bytes:
                self._close(open_buckets.pop(key))
                open_bytes[key] = 0
            open_buckets.setdefault(key, []).append(p)
            open_bytes[key] = open_bytes.get(key, 0) + nbytes
        for group in open_buckets.values():
            self._close(group)
        for p in unique:
            self.handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _close(self, group: list[torch.nn.Parameter]) -> None:
        bucket = _Bucket(group)
        self.buckets.append(bucket)
        for p in group:
            self.bucket_of[id(p)] = bucket

    def _on_grad(self, p: torch.Tensor) -> None:
        bucket = self.bucket_of[id(p)]
        bucket.ready += 1
        while self.started < len(self.buckets) and self.buckets[self.started].ready >= len(self.buckets[self.started].params):
            self._start(self.buckets[self.started])
            self.started += 1

    def _start(self, bucket: _Bucket) -> None:
        first = bucket.params[0]
        # empty, not zeros: every element is written below (one pass over the gradients, not two)
        flat = torch.empty(bucket.size + len(bucket.params), dtype=first.dtype, device=self.runtime.device)
        offset = 0
        bucket.complete = True
        for i, (p, n) in enumerate(zip(bucket.params, bucket.sizes)):
            if p.grad is not None:
                flat[offset : offset + n].copy_(p.grad.reshape(-1))
                flat[bucket.size + i] = 1
            else:
                flat[offset : offset + n].zero_()
                flat[bucket.size + i] = 0
                bucket.complete = False
            offset += n
        bucket.flat = flat
        bucket.work = self.runtime.all_reduce(flat, async_op=True)

    def finish(self) -> None:
        """Start what backward left unstarted, wait for every bucket, write the means into the
        gradients and reset for the next step."""
        for bucket in self.buckets[self.started :]:
            self._start(bucket)
        self.started = len(self.buckets)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            flat = bucket.flat
            flat.div_(self.runtime.world_size)
            # which parameters some worker has a gradient for: all of them when this worker has
            # every one (no host read); otherwise from the flags, one transfer per bucket
            present = [1.0] * len(bucket.params) if bucket.complete else flat[bucket.size :].tolist()
            offset = 0
            for i, (p, n) in enumerate(zip(bucket.params, bucket.sizes)):
                if present[i] > 0:
                    # the gradient becomes a view of the bucket (as DDP's gradient_as_bucket_view):
                    # no copy back; zero_grad(set_to_none=True) releases the bucket with the views
                    p.grad = flat[offset : offset + n].view_as(p)
                offset += n
            bucket.ready, bucket.work, bucket.flat = 0, None, None
        self.started = 0

    def __enter__(self) -> GradientSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks: the parameters outlive this sync (stage 2 follows stage 1 in-process),
        and a later backward must not start this sync's all-reduces."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

