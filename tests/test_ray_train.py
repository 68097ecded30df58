"""Stages 1-2 on a local Ray with 2 CPUs: 2 workers, and recovery after a worker is killed."""

import json
import signal
import threading
import time

import numpy as np
import pytest

from dilm_ray.config import load_config
from dilm_ray.data import load_data
from dilm_ray.train.state import TrainState

pytestmark = pytest.mark.integration


def test_two_workers_pretrain_then_distill(ray_2_cpus, tiny_overrides):
    from dilm_ray.driver.ray_train import fit_stage

    cfg = load_config("configs/sst2-cpu.yaml", tiny_overrides + ["ray.num_workers=2", "ray.cpus_per_worker=0.9", "pretrain.checkpoint_every=2"])
    ctrl_c = signal.getsignal(signal.SIGINT)
    lm = fit_stage(cfg, "pretrain")
    # Ray Train's fit() leaves its own SIGINT handler installed, bound to the finished controller
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    pre = TrainState.load(lm / "train_state.pt")
    assert (lm / "config.json").is_file() and pre.step == 3
    # rank 0 saves the state; it holds each rank's RNG as that rank left it (its stage-1 batch
    # draws replayed here), so that a resumed rank 1 goes on with its own draws, not rank 0's
    n = len(load_data(cfg, need_validation=False).train)
    for rank, saved in enumerate(pre.extra["rank_rngs"]):
        rng = np.random.default_rng(cfg.seed + rank)
        for _ in range(3):
            rng.choice(np.arange(rank, n, 2), size=cfg.pretrain.batch_size // 2, replace=False)
        assert saved == rng.bit_generator.state
    assert len(pre.extra["rank_rngs"]) == 2 and pre.rng == pre.extra["rank_rngs"][0]
    dilm = fit_stage(cfg, "distill", source=str(lm))
    state = TrainState.load(dilm / "train_state.pt")
    assert state.step == cfg.distill.steps and "resumed_from" not in state.extra
    assert len(state.extra["rank_rngs"]) == 2 and state.extra["rank_rngs"][0] != state.extra["rank_rngs"][1]


def _train_worker_processes():
    """This test's live Train worker processes: descendants of this process (the local raylet
    forks them) with the title Ray gives them. Matching the title alone killed the workers of
    another Ray session on the same machine (a benchmark running beside the test suite)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def _registered_checkpoint(run_dir) -> bool:
    """True once the controller has registered a checkpoint (a folder on disk alone is not enough:
    a worker killed before its report reaches the controller restarts from scratch)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):
        return False


@pytest.mark.slow  # 57 s; make test guards its promise with the node kill in tests/test_cluster.py (the stage resumes from a checkpoint)
def test_killed_worker_resumes_from_its_latest_checkpoint(ray_2_cpus, tiny_overrides):
    from dilm_ray.driver.ray_train import fit_stage, storage_root

    steps = 400  # the kill lands right after the first registered checkpoint (step 20)
    cfg = load_config(
        "configs/sst2-cpu.yaml",
        tiny_overrides + [f"pretrain.steps={steps}", "pretrain.log_every=1", "pretrain.checkpoint_every=20", "ray.max_failures=1", "name=kill"],
    )
    result = {}
    thread = threading.Thread(target=lambda: result.update(path=fit_stage(cfg, "pretrain")))
    thread.start()
    run_dir = storage_root(cfg) / "kill-pretrain"
    deadline = time.time() + 180
    while time.time() < deadline and not _registered_checkpoint(run_dir):
        time.sleep(0.1)
    assert _registered_checkpoint(run_dir), "no checkpoint was registered"
    workers = _train_worker_processes()
    assert workers, "no Train worker process found"
    for proc in workers:
        proc.send_signal(signal.SIGKILL)
    thread.join(timeout=500)
    assert not thread.is_alive() and "path" in result
    state = TrainState.load(result["path"] / "train_state.pt")
    assert state.step == steps
    resumed = state.extra.get("resumed_from")
    assert resumed and 0 < resumed[0] < steps, f"the run did not resume from a checkpoint: {state.extra}"

