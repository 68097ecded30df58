"""MLflow runs: an embedded SQLite store by default, one experiment per task."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from dilm_ray.config import Config, flatten
from dilm_ray.errors import UserError, first_line


def tracking_uri(cfg: Config) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def tracking_source(cfg: Config) -> str:
    """Where ``tracking_uri`` came from, as a user would set it: ``tracking.uri``,
    ``MLFLOW_TRACKING_URI``, or ``tracking.uri (unset: the default)``."""
    if cfg.tracking.uri:
        return "tracking.uri"
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri (unset: the default)"


def file_backed(uri: str) -> bool:
    """True for a store that is a file on the machine that opens it: ``sqlite:``, ``file:`` or a
    plain path. Such a store is a different file on every node of a cluster."""
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's names for Databricks workspaces, not paths
        return False
    scheme = urlsplit(uri).scheme.lower()
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # one letter: a Windows drive


SERVER_TIMEOUT_S = 3.0  # per socket operation: connect, then the answer (so at most ~6 s in all)


def check_tracking_server(cfg: Config, timeout_s: float = SERVER_TIMEOUT_S) -> None:
    """With tracking on and an ``http(s)://`` tracking URI, ask its ``/health`` once.

    Any HTTP answer below 500 counts (an authenticating proxy may refuse ``/health``), and so
    does a TLS handshake that fails (a server is there; its certificate is MLflow's client's
    business). No answer within ``timeout_s`` seconds per socket operation, or a 5xx (which
    MLflow's client retries), raises ``UserError`` naming the key the URI came from: without
    this check, MLflow's client retries an unreachable server for minutes (4 min 14 s with its
    default backoff) and ends in a traceback. Other URIs are not probed.
    """
    if not cfg.tracking.enabled:
        return
    import ssl
    import urllib.error
    import urllib.request

    uri = tracking_uri(cfg)
    if urlsplit(uri).scheme.lower() not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
        return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            return  # it answered
        problem = f"the MLflow server there is failing (/health answered HTTP {exc.code})"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return
        why = "no answer" if isinstance(reason, TimeoutError) else (getattr(reason, "strerror", None) or first_line(reason))
        problem = f"no MLflow server answers there ({why}; {timeout_s:g} s timeout)"
    raise UserError(f"{tracking_source(cfg)} {uri}: {problem}; start one (clusters/README.md) or set tracking.uri to a reachable one")


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"dilm-{cfg.data.task}"


def log_config(cfg: Config) -> None:
    import mlflow

    params = {k: str(v)[:500] for k, v in flatten(cfg.to_dict()).items()}
    items = list(params.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow.log_params(dict(items[start : start + 100]))
    mlflow.log_text(cfg.to_yaml(), "config.yaml")


@contextlib.contextmanager
def mlflow_run(cfg: Config, command: str, ids_file: Path | None = None, resume: bool = False, tags: dict[str, str] | None = None) -> Iterator[str | None]:
    """A run named ``<name>-<command>`` with the resolved config; yields its id (None if disabled).

    Its id is kept under ``command`` in ``ids_file`` (JSON); with ``resume`` the run recorded
    there is reopened (RUNNING again, its metrics and child runs kept) instead of starting a new
    one. The run ends FINISHED, FAILED on an exception, and KILLED on Ctrl-C or SIGTERM
    (``KeyboardInterrupt``, which ``interrupts.Interrupted`` subclasses).
    """
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(experiment_name(cfg))
    ids = json.loads(ids_file.read_text()) if ids_file is not None and ids_file.is_file() else {}
    earlier = ids.get(command) if resume else None
    if earlier is not None:
        try:
            mlflow.MlflowClient().get_run(earlier)
        except Exception:  # deleted, or another tracking store: start a new run
            earlier = None
    if earlier is not None:
        run = mlflow.start_run(run_id=earlier)
    else:
        run = mlflow.start_run(run_name=f"{cfg.name}-{command}", tags={"command": command, **(tags or {})})
        log_config(cfg)
        if ids_file is not None:
            ids_file.parent.mkdir(parents=True, exist_ok=True)
            ids_file.write_text(json.dumps({**ids, command: run.info.run_id}, indent=1) + "\n")
    try:
        yield run.info.run_id
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_artifacts(run_id: str | None, paths: list[Path], artifact_path: str | None = None) -> None:
    if run_id is None:
        return
    import mlflow

    client = mlflow.MlflowClient()
    for p in paths:
        if p.is_dir():
            client.log_artifacts(run_id, str(p), artifact_path)
        elif p.exists():
            client.log_artifact(run_id, str(p), artifact_path)


def log_metrics(run_id: str | None, metrics: dict[str, float]) -> None:
    """Log ``metrics`` (finite values only) to ``run_id`` at step 0; no-op without a run."""
    if run_id is None:
        return
    import mlflow

    finite = {k: float(v) for k, v in metrics.items() if v == v}
    if finite:
        mlflow.MlflowClient().log_batch(run_id, metrics=[_metric(k, v) for k, v in finite.items()])


def _metric(key: str, value: float):
    import time

    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)


EVAL_PARAMS = ("learner", "family", "method", "dpc", "set_index", "seed")
EVAL_METRICS = ("accuracy", "f1", "score", "seconds")


def log_evaluation_runs(parent_id: str | None, rows: list[dict]) -> None:
    """One child run of ``parent_id`` per evaluation run (a learner trained on one distilled set
    with one seed): its identity as params, its scores as metrics."""
    if parent_id is None:
        return
    import time

    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    now = int(time.time() * 1000)
    for row in rows:
        name = f"eval-{Path(str(row['learner'])).name}-{row['method']}-dpc{row['dpc']}-set{row['set_index']}-seed{row['seed']}"
        child = client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_id, "command": "evaluate-run"})
        params = [Param(k, str(row[k])) for k in EVAL_PARAMS if k in row]
        metrics = [Metric(k, float(row[k]), now, 0) for k in EVAL_METRICS if k in row and row[k] == row[k]]
        client.log_batch(child.info.run_id, metrics=metrics, params=params)
        client.set_terminated(child.info.run_id)
