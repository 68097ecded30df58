"""Metric loggers: console and MLflow, both silent off rank 0."""

from __future__ import annotations

from typing import Protocol


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass


def metric_line(prefix: str, step: int, metrics: dict[str, float]) -> str:
    """``[prefix step] key=value ...`` with 4 significant digits: how a log step reads on a terminal."""
    return f"[{prefix} {step}] " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class ConsoleLogger:
    def __init__(self, prefix: str, enabled: bool = True):
        self.prefix, self.enabled = prefix, enabled

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(metric_line(self.prefix, step, metrics))


class MLflowLogger:
    """Batches metrics into one ``log_metrics`` call per step (each call costs ~20 ms on SQLite).

    ``resumed``: the loop continues from a checkpoint, in a run that may already hold metrics of
    the steps after it (the worker group that wrote them died before its next checkpoint, or the
    command was interrupted). A (metric, step) already in the run is then not logged again, so
    that every step appears once; the run's history is read once per metric.
    """

    def __init__(self, prefix: str, run_id: str | None, enabled: bool = True, resumed: bool = False):
        self.prefix, self.run_id, self.enabled = prefix, run_id, enabled and run_id is not None
        self.resumed = resumed
        self.logged: dict[str, set[int]] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        import mlflow

        client = mlflow.MlflowClient()
        rows = {f"{self.prefix}.{k}": float(v) for k, v in metrics.items()}
        if self.resumed:
            for key in rows.keys() - self.logged.keys():
                self.logged[key] = {m.step for m in client.get_metric_history(self.run_id, key)}
            rows = {k: v for k, v in rows.items() if step not in self.logged[k]}
        if rows:
            client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k, v, _now_ms(), step) for k, v in rows.items()])


class MultiLogger:
    def __init__(self, *loggers: MetricLogger):
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)  # a wall-clock timestamp for MLflow, never a seed
