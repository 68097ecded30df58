"""Where results came from: the git commit of the code that made them, and the machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

from dilm_ray import __version__

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """``git rev-parse HEAD`` of the checkout this package runs from, ``+changes`` when its code,
    benchmark scripts or configs differ from it (recorded results do not count); ``dilm-ray
    <version>`` outside a git checkout. Call it when work starts: the code loaded then is what ran."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "dilm_ray", "configs", "benchmarks/*.py"], cwd=PACKAGE_ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"dilm-ray {__version__}"
    return head + ("+changes" if dirty else "")


def machine() -> dict[str, object]:
    """The machine this process runs on, as far as it moves results: the CPU model, its native
    bf16 instructions (``avx512_bf16``, ``amx_bf16``: bf16 kernels, and so bf16 results, differ
    between CPUs with and without them), the CPUs this process may use, the first GPU's name
    (None without CUDA), and the torch and transformers versions. ``cpu`` is
    ``platform.processor()`` where /proc/cpuinfo has no model name (ARM). On a Ray cluster the
    stages may run on other nodes: this is the driver's machine."""
    import os
    import platform

    import torch
    import transformers

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first processor's fields
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu, flags = fields.get("model name") or platform.processor() or "unknown", set(fields.get("flags", "").split())
    return {
        "cpu": cpu, "bf16_instructions": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
