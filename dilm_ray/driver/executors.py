"""Executors of evaluation jobs: the same callable in this process or as Ray tasks.

``fn(*args, cache=dict)`` is the leaf (``evaluation.job.run_job``); ``cache`` is a per-process
dict in which it may keep built models between calls. ``on_result(i, result)`` sees each
result as soon as it exists (callers save it there), so an interrupt loses only the jobs that
had not finished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from tqdm.auto import tqdm

from dilm_ray.config import Config

OnResult = Callable[[int, Any], None]


class Executor(Protocol):
    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], on_result: OnResult | None = None) -> list[Any]: ...


class InProcess:
    """One call after another in this process, with one model cache for all of them."""

    def __init__(self, desc: str = "evaluate") -> None:
        self.desc = desc
        self.cache: dict[str, Any] = {}

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], on_result: OnResult | None = None) -> list[Any]:
        results = []
        for i, args in enumerate(tqdm(calls, desc=self.desc)):
            results.append(fn(*args, cache=self.cache))
            if on_result is not None:
                on_result(i, results[-1])
        return results


_CACHE: dict[str, Any] = {}  # per Ray worker process: models built once, reset per job


def _remote_call(fn: Callable[..., Any], *args: Any) -> Any:
    import ray
    import torch

    # As many torch threads as CPUs the task holds: config.threads would oversubscribe the node
    # when several tasks run side by side.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))
    return fn(*args, cache=_CACHE)


class RayTasks:
    """One Ray task per call (``ray.cpus_per_eval_task``/``gpus_per_eval_task`` each). Every
    distinct argument object goes to the object store once and is passed by reference, so a
    validation split shared by all calls is serialised once. On an interrupt the pending tasks
    are cancelled and the interrupt propagates."""

    def __init__(self, cfg: Config, desc: str = "evaluate (ray)") -> None:
        self.cfg, self.desc = cfg, desc

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], on_result: OnResult | None = None) -> list[Any]:
        import ray

        from dilm_ray.driver.ray_env import ensure_ray

        ensure_ray(self.cfg)
        remote = ray.remote(_remote_call).options(num_cpus=self.cfg.ray.cpus_per_eval_task, num_gpus=self.cfg.ray.gpus_per_eval_task)
        fn_ref = ray.put(fn)
        refs: dict[int, Any] = {}
        for args in calls:
            for a in args:
                if id(a) not in refs:
                    refs[id(a)] = ray.put(a)
        pending = {remote.remote(fn_ref, *(refs[id(a)] for a in args)): i for i, args in enumerate(calls)}
        results: list[Any] = [None] * len(calls)
        try:
            with tqdm(total=len(calls), desc=self.desc) as bar:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    for ref in done:
                        i = pending.pop(ref)
                        results[i] = ray.get(ref)
                        if on_result is not None:
                            on_result(i, results[i])
                        bar.update(1)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return results


def executor(cfg: Config, parallel: bool | None = None) -> Executor:
    """Ray tasks when ``evaluate.parallel`` (or ``parallel``) is set, else in-process."""
    return RayTasks(cfg) if (cfg.evaluate.parallel if parallel is None else parallel) else InProcess()
