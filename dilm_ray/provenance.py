"""Where results came from: the git commit of the code that made them."""

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
