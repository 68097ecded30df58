"""Connecting to Ray: an embedded local instance by default, a cluster with ``ray.address``/RAY_ADDRESS."""

from __future__ import annotations

import logging
import os

from dilm_ray import interrupts
from dilm_ray.config import Config

# The Train controller polls workers every 2 s by default, which makes each report() block ~2 s.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "TOKENIZERS_PARALLELISM": "false"}
# transformers' and the hub's per-load bars ("Loading weights", "Writing model shards") say nothing
# a user acts on; the CLI sets this before transformers is imported (a user's own value wins)
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def ensure_ray(cfg: Config) -> None:
    """``ray.init`` once per process, forwarding the environment the workers need.

    Worker output is not forwarded to the terminal (``log_to_driver=False``): Train workers write
    their own log files and the driver draws their progress (``driver.progress``); evaluation
    tasks return what they measured. Forwarded, tqdm redraws and Ray's own worker chatter filled
    ``make run``'s terminal with hundreds of empty ``(RayTrainWorker pid=...)`` lines. Other
    workers' output stays in Ray's session logs (``/tmp/ray/session_*/logs``). For a Ray this process starts itself (no
    ``ray.address``), the note that token authentication is on by default is silenced: the
    token is generated locally and there is nothing to do about it.

    ``ray.init`` replaces the SIGTERM handler with ``sys.exit``; the command's own handler
    (``interrupts``) is put back so that SIGTERM still ends the command cleanly.
    """
    import ray

    if ray.is_initialized():
        return
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address, runtime_env={"env_vars": worker_env(cfg)}, logging_level="WARNING", log_to_driver=False)
    interrupts.reinstall()


def worker_env(cfg: Config) -> dict[str, str]:
    """The environment every Ray worker of this run gets: ``TRAIN_ENV``, the hub, cache and MLflow
    settings set here, and ``OMP_NUM_THREADS=threads`` when the config sets ``threads`` (and the
    environment does not already).

    Why the thread count: Ray starts a worker that holds 1 CPU with ``OMP_NUM_THREADS=1``, and
    raising torch's threads afterwards (``setup_torch``) does not undo all of it. Measured here
    (``benchmarks/ray_overhead.py``, SmolLM2 stage-1 step in bf16, 2 threads): 1.43 s per step
    in a 1-worker Ray Train run with Ray's value, 1.23 s with ``OMP_NUM_THREADS=2``, 0.96-1.06 s
    in-process. Evaluation tasks still set their own thread count from the CPUs they hold.
    """
    keys = (*TRAIN_ENV, *QUIET_ENV, "HF_HUB_OFFLINE", "DILM_RAY_CACHE", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS")
    env = {**TRAIN_ENV, **QUIET_ENV, **{k: os.environ[k] for k in keys if k in os.environ}}
    if cfg.threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    return env
