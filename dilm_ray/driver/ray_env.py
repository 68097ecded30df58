"""Connecting to Ray: an embedded local instance by default, a cluster with ``ray.address``/RAY_ADDRESS."""

from __future__ import annotations

import os

from dilm_ray import interrupts
from dilm_ray.config import Config

# The Train controller polls workers every 2 s by default, which makes each report() block ~2 s.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "TOKENIZERS_PARALLELISM": "false"}


def ensure_ray(cfg: Config) -> None:
    """``ray.init`` once per process, forwarding the environment the workers need.

    ``ray.init`` replaces the SIGTERM handler with ``sys.exit``; the command's own handler
    (``interrupts``) is put back so that SIGTERM still ends the command cleanly.
    """
    import ray

    if ray.is_initialized():
        return
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: os.environ[k] for k in (*TRAIN_ENV, "HF_HUB_OFFLINE", "DILM_RAY_CACHE", "MLFLOW_TRACKING_URI") if k in os.environ}
    ray.init(address=address, runtime_env={"env_vars": env_vars}, logging_level="WARNING", log_to_driver=True)
    interrupts.reinstall()
