"""Evaluation runs as Ray remote tasks: distilled sets and validation data are put in the
object store once and shared by reference; each worker process keeps its models cached."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from dilm_ray.config import Config
from dilm_ray.data import TaskSpec, TextSet

_CACHE: dict[str, Any] = {}  # per Ray worker process: models built once, reset per run


def _remote_run(cfg_dict: dict, task: TaskSpec, validation: TextSet, train: TextSet, run) -> dict:
    import ray

    from dilm_ray.evaluation.runner import run_one

    # As many torch threads as CPUs the task holds: config.threads would oversubscribe the node
    # when several tasks run side by side.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    cfg_dict = {**cfg_dict, "threads": max(1, int(cpus))}
    return run_one(Config.model_validate(cfg_dict), task, validation, train, run, _CACHE)


def run_parallel(cfg: Config, task: TaskSpec, validation: TextSet, groups: dict, plan: list, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    import ray

    from dilm_ray.ray_env import ensure_ray

    ensure_ray(cfg)
    remote = ray.remote(_remote_run).options(num_cpus=cfg.ray.cpus_per_eval_task, num_gpus=cfg.ray.gpus_per_eval_task)
    cfg_ref, val_ref = ray.put(cfg.to_dict()), ray.put(validation)
    set_refs = {(g, i): ray.put(s) for g, sets in groups.items() for i, s in enumerate(sets)}
    pending = {remote.remote(cfg_ref, task, val_ref, set_refs[((r.method, r.dpc), r.set_index)], r): n for n, r in enumerate(plan)}
    rows: list[dict | None] = [None] * len(plan)
    with tqdm(total=len(plan), desc="evaluate (ray)") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                row = rows[pending.pop(ref)] = ray.get(ref)
                if on_row is not None:
                    on_row(row)
                bar.update(1)
    return rows
