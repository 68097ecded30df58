"""Process set-up from the config: torch threads and the global seed (never the clock)."""

from __future__ import annotations

import torch

from dilm_ray.config import Config


def setup_torch(cfg: Config, rank: int = 0) -> None:
    """``torch.set_num_threads(cfg.threads)`` (if set) and ``torch.manual_seed(cfg.seed + rank)``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
