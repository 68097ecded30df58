"""``dilm-ray ui``: the MLflow UI, opened on an experiment's runs table.

MLflow 3.17's UI opens an experiment in its GenAI view (traces, judges, assistant); the runs are
listed under "Model training", which the UI selects from the ``workflowType=machine_learning``
query parameter of the experiment page (``#/experiments/<id>/runs``) and then keeps in the
browser's local storage (``mlflow.workflowType``).

The runs page reads only its search facets from the URL (``searchFilter``, ``orderByKey``,
``orderByAsc``, ``startTime``, ``lifecycleFilter``, ``modelVersionFilter``, ``datasetsFilter``);
the visible columns (``selectedColumns``) are UI state, not a URL parameter. The supported way
to ship columns in a link is a saved view: an experiment tag
``mlflow.sharedViewState.<key>`` holding ``{"name", "createdAt", "updatedAt", "state"}``, where
``state`` is the JSON of the search facets plus the UI state, opened with
``?viewStateShareKey=<key>`` (the UI lists the same tag under "Saved views"). A URL that also
carries search facets makes the UI ignore the view, so :func:`experiment_url` takes one or the
other.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterable

SHARED_VIEW_TAG = "mlflow.sharedViewState."
RUNS_VIEW_KEY = "dilm-eval-runs"
RUNS_VIEW_NAME = "dilm: evaluation runs"
# The evaluation child runs (tracking.mlflow_store.log_evaluation_runs) carry this tag.
EVALUATION_RUNS_FILTER = "tags.command = 'evaluate-run'"
# Shown in this order after the run name and start time, instead of the UI's default Source,
# Models and Dataset columns.
RUNS_VIEW_COLUMNS = ("params.method", "params.dpc", "params.learner", "metrics.score", "metrics.accuracy", "metrics.f1", "params.seed", "params.set_index", "params.family")
COLUMN_WIDTH = 90
WIDE_COLUMNS = {"params.`learner`": 140}


def column_key(column: str) -> str:
    """``params.dpc`` -> the UI's column key ``params.`dpc```; ``attributes.`Source``` is kept."""
    kind, sep, name = column.partition(".")
    if not sep or kind not in ("attributes", "params", "metrics", "tags"):
        raise ValueError(f"column {column!r}: expected params.NAME, metrics.NAME, tags.NAME or attributes.NAME")
    return column if name.startswith("`") else f"{kind}.`{name}`"


def experiment_url(
    base_url: str,
    experiment_id: str,
    *,
    view_key: str | None = None,
    search_filter: str | None = None,
    order_by: str | None = None,
    ascending: bool = False,
) -> str:
    """The experiment's runs table in the UI's "Model training" view.

    ``view_key``: a saved view (see :func:`save_runs_view`) that chooses columns, filter and sort.
    Without it, ``search_filter`` (an MLflow search filter) and ``order_by`` (e.g. ``metrics.score``)
    go into the URL; the columns are then the UI's default (or what the browser kept).
    """
    if view_key is not None and (search_filter or order_by):
        raise ValueError("a saved view carries its own filter and sort; the UI ignores the view when the URL sets them")
    query: list[tuple[str, str]] = [("workflowType", "machine_learning")]
    if view_key is not None:
        query.append(("viewStateShareKey", view_key))
    if search_filter:
        query.append(("searchFilter", search_filter))
    if order_by:
        query += [("orderByKey", column_key(order_by)), ("orderByAsc", "true" if ascending else "false")]
    route = f"/experiments/{urllib.parse.quote(str(experiment_id), safe='')}/runs"
    return f"{base_url.rstrip('/')}/#{route}?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"


def runs_view_state(
    columns: Iterable[str] = RUNS_VIEW_COLUMNS,
    search_filter: str = EVALUATION_RUNS_FILTER,
    order_by: str | None = "metrics.score",
    ascending: bool = False,
) -> dict:
    """The state of a saved runs view: search facets plus the UI state the UI restores from it.

    ``columns`` are shown in that order (``columnOrder``; parameters and metrics may interleave).
    """
    keys = [column_key(c) for c in columns]
    return {
        "searchFilter": search_filter,
        "orderByKey": column_key(order_by) if order_by else "attributes.start_time",
        "orderByAsc": ascending,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": keys,
        "columnOrder": keys,
        "columnWidths": {k: WIDE_COLUMNS.get(k, COLUMN_WIDTH) for k in keys},
        "runsHiddenMode": "SHOW_ALL",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "groupBy": None,
        "groupsExpanded": {},
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
    }


def save_runs_view(client, experiment_id: str, key: str = RUNS_VIEW_KEY, name: str = RUNS_VIEW_NAME, state: dict | None = None) -> str:
    """Write (or update) the saved view ``key`` on the experiment; returns ``key``.

    ``client``: an ``mlflow.MlflowClient``. Only the tag ``mlflow.sharedViewState.<key>`` is written.
    """
    tag = SHARED_VIEW_TAG + key
    now = int(time.time() * 1000)
    state_json = json.dumps(runs_view_state() if state is None else state, separators=(",", ":"))
    created = now
    earlier = client.get_experiment(experiment_id).tags.get(tag)
    if earlier:
        try:
            old = json.loads(earlier)
            if old.get("state") == state_json and old.get("name") == name:
                return key
            created = int(old.get("createdAt", now))
        except (ValueError, TypeError, AttributeError):
            pass
    client.set_experiment_tag(experiment_id, tag, json.dumps({"name": name, "createdAt": created, "updatedAt": now, "state": state_json}))
    return key


def _browser_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_for_health(base_url: str, timeout: float, process: subprocess.Popen | None = None) -> bool:
    """Poll ``<base_url>/health`` until it answers 200; False after ``timeout`` s or if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    return False


def _stop(process: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM to the server's process group (uvicorn, the job runner and its consumers); SIGKILL
    to what is left of the group once the server exited, or to all of it after ``timeout`` s."""
    if not hasattr(os, "killpg"):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        return process.wait()

    def signal_group(signum: int) -> None:
        try:
            os.killpg(process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    if process.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    signal_group(signal.SIGKILL)  # stragglers whose parent is gone
    return process.wait()


def _open_in_browser(url: str, echo: Callable[[str], None]) -> None:
    import webbrowser

    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        echo("(no browser found here; open the URL yourself)")
        return
    try:
        browser.open(url)
    except Exception as e:  # a browser that fails to start must not stop the server
        echo(f"(could not open a browser: {e})")


def serve(
    store: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    experiment_name: str | None = None,
    open_browser: bool = True,
    *,
    save_view: bool = True,
    health_timeout: float = 180.0,
    echo: Callable[[str], None] = functools.partial(print, flush=True),
) -> int:
    """Serve the MLflow UI on ``store`` until Ctrl-C (or SIGTERM); returns the server's exit status.

    Prints the base URL and, when ``experiment_name`` exists in the store, the URL of its runs
    table in the training view (with the saved view ``RUNS_VIEW_KEY`` written first when
    ``save_view``); opens that URL in a browser when ``open_browser`` and one is available.
    Returns 0 after Ctrl-C/SIGTERM, 1 if the server did not come up within ``health_timeout`` s.
    """
    base_url = f"http://{_browser_host(host)}:{port}"
    if _listening(_browser_host(host).strip("[]"), port):
        # Else /health could answer from that other server.
        echo(f"Something already listens on {base_url}; choose another --port.")
        return 1
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", host, "--port", str(port), "--workers", "1"]
    echo(f"Starting the MLflow UI on {base_url} (store {store}) ...")
    # Its own process group: on stop the whole server (uvicorn and its children) goes at once.
    process = subprocess.Popen(command, start_new_session=True)
    previous_term = None

    def on_term(signum, frame):  # SIGTERM on us: stop like Ctrl-C
        raise KeyboardInterrupt

    try:
        try:
            previous_term = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            previous_term = None
        if not wait_for_health(base_url, health_timeout, process):
            code = process.poll()
            echo(f"The MLflow UI did not start ({'exit status ' + str(code) if code is not None else f'no answer on {base_url}/health after {health_timeout:.0f} s'}).")
            _stop(process)
            return code or 1
        url = base_url
        echo(f"MLflow UI: {base_url}")
        if experiment_name:
            url = _experiment_link(store, base_url, experiment_name, save_view, echo) or base_url
        if open_browser:
            _open_in_browser(url, echo)
        echo("Ctrl-C stops the server.")
        return process.wait()
    except KeyboardInterrupt:
        echo("Stopping the MLflow UI ...")
        _stop(process)
        return 0
    finally:
        if process.poll() is None:
            _stop(process)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _experiment_link(store: str, base_url: str, experiment_name: str, save_view: bool, echo: Callable[[str], None]) -> str | None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store)
    try:
        experiment = client.get_experiment_by_name(experiment_name)
    except Exception as e:
        echo(f"(could not read experiment {experiment_name}: {e})")
        return None
    if experiment is None:
        echo(f"(no experiment {experiment_name} in {store} yet)")
        return None
    view_key = None
    if save_view:
        try:
            view_key = save_runs_view(client, experiment.experiment_id)
        except Exception as e:  # e.g. a read-only store: fall back to a filter/sort URL
            echo(f"(could not save the runs view: {e})")
    if view_key is not None:
        url = experiment_url(base_url, experiment.experiment_id, view_key=view_key)
        echo(f"Runs of {experiment_name}: {url}")
        echo(f"  (all runs: {experiment_url(base_url, experiment.experiment_id)})")
    else:
        url = experiment_url(base_url, experiment.experiment_id, search_filter=EVALUATION_RUNS_FILTER, order_by="metrics.score")
        echo(f"Runs of {experiment_name}: {url}")
    return url
