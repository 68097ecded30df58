"""Label fidelity: the share of generated rows a reference classifier gives their own label."""

import math

import numpy as np
import pandas as pd

from dilm_ray.data import TextSet
from dilm_ray.evaluation.fidelity import group_fidelity, label_fidelity, reference_classifier
from dilm_ray.evaluation.report import results_table, to_markdown


def _set(labels):
    return TextSet(("sentence",), tuple((f"row {i}",) for i in range(len(labels))), np.array(labels))


def test_fidelity_counts_rows_whose_reference_label_is_their_own_overall_and_per_label():
    says_zero = lambda data: np.zeros(len(data), dtype=np.int64)  # noqa: E731
    fid = label_fidelity(says_zero, [_set([0, 0, 1]), _set([1, 0, 1, 1])], num_labels=3)
    assert fid.rows == 7 and math.isclose(fid.overall, 3 / 7)
    assert fid.by_label[:2] == (1.0, 0.0) and math.isnan(fid.by_label[2])
    assert fid.text() == "42.9 (100/0/-)"


def test_coresets_are_not_measured_the_reference_was_fitted_on_their_rows():
    groups = {("dilm", 2): [_set([0, 1])], ("k_centers", 2): [_set([0, 1])], ("random", 2): [_set([0, 1])], ("dataset", 5): [_set([1, 1])]}
    found = group_fidelity(lambda d: np.ones(len(d), dtype=np.int64), groups, 2)
    assert set(found) == {("dilm", 2), ("dataset", 5)} and found[("dataset", 5)].overall == 1.0


def test_the_reference_classifier_learns_the_toy_labels(toy_sets):
    train, val = toy_sets
    assert (reference_classifier(train)(val) == val.labels).mean() > 0.9


def test_tables_carry_fidelity_for_generated_groups_and_leave_coresets_blank():
    runs = pd.DataFrame([{"learner": "m", "dpc": 2, "method": m, "score": s, "seconds": 1.0} for m in ("dilm", "random") for s in (0.6, 0.7)])
    fid = label_fidelity(lambda d: np.asarray(d.labels), [_set([0, 1])], 2)
    table = results_table(runs, ["dilm"], {("dilm", 2): fid})
    md = to_markdown(table, "accuracy").splitlines()
    assert md[0].endswith("label fidelity % (per label) |")
    assert md[2].endswith("| 100.0 (100/100) |") and "| dilm |" in md[2]
    assert md[3].endswith("|  |") and "| random |" in md[3]
