"""benchmarks/learner_probe.py: the held-out rows it scores on never include rows distillation saw."""

import numpy as np
import pytest

from dilm_ray.data import TextSet
from dilm_ray.errors import UserError
from tests.conftest import benchmark_script


def _rows(texts: list[str]) -> TextSet:
    return TextSet(("sentence",), [(t,) for t in texts], np.arange(len(texts)) % 2)


def test_held_out_rows_avoid_the_train_subset_and_are_seeded():
    probe = benchmark_script("learner_probe")
    full = _rows([f"row {i}" for i in range(50)])
    used = full.select(np.arange(0, 50, 2))  # the even rows were distilled from
    held = probe.held_out_rows(full, used, 20, seed=3)
    assert len(held) == 20 and len(set(held.texts)) == 20
    assert not set(held.texts) & set(used.texts)
    assert held.texts == probe.held_out_rows(full, used, 20, seed=3).texts
    assert held.texts != probe.held_out_rows(full, used, 20, seed=4).texts
    with pytest.raises(UserError, match="only 25 train rows"):
        probe.held_out_rows(full, used, 26, seed=3)
