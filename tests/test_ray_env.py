"""What every Ray worker of a run inherits."""

from dilm_ray.config import load_config
from dilm_ray.driver.ray_env import worker_env


def test_workers_get_the_configured_thread_count_unless_the_environment_sets_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = worker_env(load_config(None, ["threads=2"]))
    # Ray would start a 1-CPU worker with OMP_NUM_THREADS=1, which slows its torch ops
    assert env["OMP_NUM_THREADS"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.1"
    assert "OMP_NUM_THREADS" not in worker_env(load_config(None, []))  # threads unset: Ray decides
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert worker_env(load_config(None, ["threads=2"]))["OMP_NUM_THREADS"] == "4"
