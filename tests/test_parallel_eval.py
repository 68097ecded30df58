"""Ray-task evaluation gives the same table as the sequential loop with the same seeds."""

import os
import tempfile

import pandas as pd
import pytest

from dilm_ray.config import DataConfig, load_config
from dilm_ray.data import BUILTIN_TASKS, load_split, resolve_task
from dilm_ray.evaluation.runner import evaluate_groups, results_table

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_2_cpus(tmp_path_factory):
    import ray

    ray.shutdown()  # a CLI test may have left its embedded Ray running
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, _temp_dir=tempfile.mkdtemp(prefix="r", dir="/tmp"), include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_parallel_matches_sequential(ray_2_cpus, tiny_bert_dir, toy_data_dir, tiny_overrides):
    cfg = load_config("configs/sst2-cpu.yaml", tiny_overrides + ["evaluate.steps=20", "evaluate.lr=3e-3", "synthesize.n_datasets=2", "evaluate.n_evals_per_dataset=1", "ray.cpus_per_eval_task=1"])
    data_cfg = DataConfig(path=str(toy_data_dir))
    train = load_split(data_cfg, resolve_task(data_cfg), "train")
    val = load_split(data_cfg, resolve_task(data_cfg), "validation")
    groups = {("dilm", 4): [train.select(range(0, 8)), train.select(range(8, 16))], ("random", 4): [train.select(range(16, 24)), train.select(range(24, 32))]}
    learners = [str(tiny_bert_dir), "tfidf-logreg"]
    seq = evaluate_groups(cfg, BUILTIN_TASKS["sst2"], val, groups, learners, parallel=False)
    par = evaluate_groups(cfg, BUILTIN_TASKS["sst2"], val, groups, learners, parallel=True)
    key = ["learner", "method", "dpc", "set_index", "seed"]
    merged = seq.merge(par, on=key, suffixes=("_seq", "_par"))
    assert len(merged) == len(seq) == len(par) == 2 * 2 * 2
    pd.testing.assert_series_equal(merged.accuracy_seq, merged.accuracy_par, check_names=False)
    cols = ["learner", "dpc", "method", "mean", "std", "runs"]
    pd.testing.assert_frame_equal(results_table(seq)[cols], results_table(par)[cols])
