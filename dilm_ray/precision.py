"""Numeric precision of the hot paths: ``bf16`` mixed precision or plain ``fp32``.

``bf16`` runs forward passes (and so their backward passes) under ``torch.autocast(bfloat16)``:
matrix products in bfloat16, fp32 master weights and optimizer state for every trained
parameter. Frozen parameters are held in bfloat16 outright (``hold_frozen``): autocast caches
the bf16 copy of a trained weight once per region, but re-casts a frozen one at every call.

What stays fp32 and why: the LM losses (``logits.float()`` before the cross-entropy: a 49k-way
log-softmax in bf16 loses ~2 significant digits, and the losses set the sample weights), the
sample weights softmax(-loss / T), the per-sample head gradients and the matching loss (a
cosine of gradients whose differences are small; DiLM's reference code also computes it in
fp32), the learners' cross-entropy, and everything an optimizer touches.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Precision = Literal["bf16", "fp32"]
PRECISIONS = ("bf16", "fp32")


@functools.cache
def cpu_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX-BF16 flags).

    Without them PyTorch emulates bf16 matrix products, usually slower than fp32.
    Non-Linux hosts (no /proc/cpuinfo) answer False.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(requested: str, use_gpu: bool) -> Precision:
    """``auto`` -> ``bf16`` where the hardware runs it (CUDA workers; CPUs with native bf16,
    see ``cpu_bf16``), else ``fp32``; ``bf16`` / ``fp32`` pass through.

    ``use_gpu``: the run's workers are CUDA GPUs (``ray.use_gpu``); the driver may have none, so
    this trusts the flag rather than probing a local device. Raises ValueError for another value.
    """
    if requested in PRECISIONS:
        return requested  # type: ignore[return-value]
    if requested != "auto":
        raise ValueError(f"precision must be auto, bf16 or fp32, not {requested!r}")
    return "bf16" if use_gpu or cpu_bf16() else "fp32"


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """``torch.autocast(device type, bfloat16)`` for ``bf16``; a no-op context for ``fp32``."""
    device_type = torch.device(device).type
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def hold_frozen(model: nn.Module, precision: str) -> int:
    """Under ``bf16``, store every parameter that does not require grad in bfloat16, in place.

    Buffers (rotary frequencies, position ids) keep their dtype. The model must then run under
    ``autocast`` (a frozen bf16 layer refuses fp32 inputs outside it). Returns the number of
    elements converted (0 under ``fp32``).
    """
    if precision != "bf16":
        return 0
    converted = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
                converted += p.numel()
    return converted


def prepare(model: nn.Module, precision: str, device: torch.device | str = "cpu") -> None:
    """Make ``model`` ready to run under ``precision``, in place: ``hold_frozen``, and on CPU under
    ``bf16`` the eager attention of ``transformers`` instead of SDPA.

    Why eager: PyTorch's CPU flash-attention kernel is slow in bf16 at our lengths. Measured
    here (SmolLM2-135M stage-1 step, 16 rows of <= 40 tokens, 2 threads): its backward took
    16 ms per layer in bf16 against 2.4 ms in fp32; the step took 2.08 s with it and 1.43 s
    with eager attention. Models without ``set_attn_implementation`` are left as they are.
    """
    hold_frozen(model, precision)
    if precision == "bf16" and torch.device(device).type == "cpu" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")


def key_parts(precision: str) -> list[str]:
    """What a cache or record key adds for ``precision``: nothing for ``fp32`` (every key made
    before precision was a setting is an fp32 key, and stays valid), ``["bf16"]`` otherwise."""
    return [] if precision == "fp32" else [precision]
