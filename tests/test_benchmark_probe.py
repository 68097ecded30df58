"""benchmarks/learner_probe.py: it scores on the package's development split (held-out train
rows, never rows distillation saw, never the validation split)."""

import pytest

from dilm_ray.config import load_config
from dilm_ray.data import load_data
from dilm_ray.errors import UserError
from tests.conftest import benchmark_script


def test_held_out_rows_are_the_development_split(toy_data_dir):
    probe = benchmark_script("learner_probe")
    base = [f"data.path={toy_data_dir}", "data.max_train_samples=100", "data.balanced=true"]
    cfg, data = probe.load_probe_data(None, base, 40)
    assert cfg.data.dev_samples == 40 and len(data.validation) == 40
    dev = load_data(load_config(None, [*base, "data.dev_samples=40"]))
    assert data.validation.digest() == dev.validation.digest() and data.train.digest() == dev.train.digest()
    with pytest.raises(UserError, match="data.dev_samples=101: only 100 train rows are left"):
        probe.load_probe_data(None, base, 101)
