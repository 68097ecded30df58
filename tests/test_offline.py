"""Without a reachable hub, a command that needs it fails in seconds with its one line, not
after the libraries' retries (about 40 s per resource on this machine)."""

import os
import socket
import subprocess
import sys
import time

import pytest


@pytest.fixture
def refused_endpoint():
    """An address on this machine where nothing listens: every connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _run(args, endpoint):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = endpoint
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dilm_ray.cli", *args], env=env, capture_output=True, text=True, timeout=120)
    return result, time.perf_counter() - start


def test_hub_data_fails_fast_and_names_data_path(refused_endpoint):
    result, seconds = _run(["validate", "configs/mnli.yaml"], refused_endpoint)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert f"the hub at {refused_endpoint} cannot be reached" in result.stderr and "set data.path to a local folder" in result.stderr
    assert seconds < 30, seconds  # no retry loop (it took ~40 s per resource before)


def test_hub_model_fails_fast_and_names_the_embedded_models(refused_endpoint, toy_data_dir, tmp_path):
    args = ["pretrain", "configs/sst2-cpu.yaml", f"data.path={toy_data_dir}", "generator.model=gpt2", f"output_dir={tmp_path}", "tracking.enabled=false"]
    result, seconds = _run(args, refused_endpoint)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "generator.model: cannot load 'gpt2'" in result.stderr and "smollm2-135m, minilm-l6" in result.stderr
    assert seconds < 30, seconds
