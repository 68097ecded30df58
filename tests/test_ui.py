"""``dilm_ray.commands.ui``: the runs-table URL, the saved view, and a real ``mlflow ui``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from dilm_ray.commands import ui

ROOT = Path(__file__).resolve().parents[1]


def test_experiment_url_forms():
    base = "http://127.0.0.1:5000/"
    assert ui.experiment_url(base, "7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert (
        ui.experiment_url(base, "7", view_key="dilm-eval-runs")
        == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=dilm-eval-runs"
    )
    url = ui.experiment_url(base, "7", search_filter="tags.command = 'evaluate-run'", order_by="metrics.score")
    route, _, query = url.partition("#")[2].partition("?")
    assert route == "/experiments/7/runs"
    assert urllib.parse.parse_qs(query) == {
        "workflowType": ["machine_learning"],
        "searchFilter": ["tags.command = 'evaluate-run'"],
        "orderByKey": ["metrics.`score`"],
        "orderByAsc": ["false"],
    }
    with pytest.raises(ValueError):  # the UI ignores a view when the URL sets filter or sort
        ui.experiment_url(base, "7", view_key="k", order_by="metrics.score")


def test_column_keys_and_view_state():
    assert ui.column_key("params.dpc") == "params.`dpc`"
    assert ui.column_key("metrics.`score`") == "metrics.`score`"
    with pytest.raises(ValueError):
        ui.column_key("dpc")
    state = ui.runs_view_state()
    assert state["selectedColumns"][:4] == ["params.`method`", "params.`dpc`", "params.`learner`", "metrics.`score`"]
    assert state["columnOrder"] == state["selectedColumns"]
    assert state["orderByKey"] == "metrics.`score`" and state["orderByAsc"] is False
    assert state["searchFilter"] == ui.EVALUATION_RUNS_FILTER


def test_save_runs_view_writes_one_envelope_tag():
    tags: dict[str, str] = {}
    client = SimpleNamespace(
        get_experiment=lambda eid: SimpleNamespace(tags=dict(tags)),
        set_experiment_tag=lambda eid, key, value: tags.__setitem__(key, value),
    )
    assert ui.save_runs_view(client, "3") == ui.RUNS_VIEW_KEY
    (key, value), = tags.items()
    assert key == "mlflow.sharedViewState." + ui.RUNS_VIEW_KEY
    envelope = json.loads(value)  # the UI's saved-view envelope: name, createdAt, updatedAt, state
    assert envelope["name"] == ui.RUNS_VIEW_NAME and isinstance(envelope["createdAt"], int)
    assert json.loads(envelope["state"]) == ui.runs_view_state()
    ui.save_runs_view(client, "3")  # unchanged: not rewritten
    assert tags[key] == value


def test_serve_refuses_a_busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        lines: list[str] = []
        assert ui.serve("sqlite:///unused.db", "127.0.0.1", s.getsockname()[1], None, False, echo=lines.append) == 1
    assert "already listens" in lines[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.integration
def test_serve_opens_the_runs_table(tmp_path):
    import mlflow
    from mlflow.entities import Metric, Param

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment_id = client.create_experiment("dilm-sst2", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id, run_name="toy-run", tags={"command": "run"})
    client.set_terminated(parent.info.run_id)
    for i, method in enumerate(("dilm", "random")):
        child = client.create_run(experiment_id, run_name=f"eval-{method}", tags={"mlflow.parentRunId": parent.info.run_id, "command": "evaluate-run"})
        params = {"learner": "bert", "family": "bert", "method": method, "dpc": "5", "set_index": "0", "seed": "0"}
        metrics = {"accuracy": 0.6 + i / 10, "score": 0.6 + i / 10, "f1": 0.5 + i / 10, "seconds": 1.0}
        client.log_batch(child.info.run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()], params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(child.info.run_id)

    port = _free_port()
    code = f"import sys; from dilm_ray.commands.ui import serve; sys.exit(serve({store!r}, '127.0.0.1', {port}, 'dilm-sst2', False, health_timeout=120))"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def default_sigint():
        """SIGINT as a terminal's foreground job has it. A suite started in the background
        (`make test &`) ignores SIGINT and its children inherit that (a suite run so once timed out
        here waiting for the server to stop, likely for this)."""
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               preexec_fn=default_sigint)
    try:
        url = None
        printed = []
        deadline = time.monotonic() + 150
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            printed.append(line)
            if line.startswith("Runs of dilm-sst2: "):
                url = line.split(": ", 1)[1].strip()
        assert url == ui.experiment_url(f"http://127.0.0.1:{port}", experiment_id, view_key=ui.RUNS_VIEW_KEY), "".join(printed)
        assert f"MLflow UI: http://127.0.0.1:{port}\n" in printed

        with urllib.request.urlopen(url, timeout=30) as page:  # urllib leaves the #fragment out
            assert page.status == 200
            assert "<div id=\"root\"" in page.read().decode().replace("'", '"')
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        runs = _post(f"{base}/runs/search", {"experiment_ids": [experiment_id]})["runs"]
        assert len(runs) == 3
        evaluations = _post(f"{base}/runs/search", {"experiment_ids": [experiment_id], "filter": ui.EVALUATION_RUNS_FILTER, "order_by": ["metrics.score DESC"]})["runs"]
        assert [{p["key"]: p["value"] for p in r["data"]["params"]}["method"] for r in evaluations] == ["random", "dilm"]
        with urllib.request.urlopen(f"{base}/experiments/get?experiment_id={experiment_id}", timeout=30) as response:
            tags = {t["key"]: t["value"] for t in json.loads(response.read())["experiment"]["tags"]}
        assert json.loads(json.loads(tags["mlflow.sharedViewState." + ui.RUNS_VIEW_KEY])["state"]) == ui.runs_view_state()

        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(30) == 0
        assert not ui._listening("127.0.0.1", port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
