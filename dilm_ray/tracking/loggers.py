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
    """Batches metrics into one ``log_metrics`` call per step (each call costs ~20 ms on SQLite)."""

    def __init__(self, prefix: str, run_id: str | None, enabled: bool = True):
        self.prefix, self.run_id, self.enabled = prefix, run_id, enabled and run_id is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            mlflow.MlflowClient().log_batch(
                self.run_id,
                metrics=[mlflow.entities.Metric(f"{self.prefix}.{k}", float(v), _now_ms(), step) for k, v in metrics.items()],
            )


class MultiLogger:
    def __init__(self, *loggers: MetricLogger):
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)  # a wall-clock timestamp for MLflow, never a seed
