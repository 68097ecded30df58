"""The evaluation plan: per-learner seed counts and their validation."""

import pytest

from dilm_ray.errors import UserError
from tests.conftest import benchmark_script


def test_a_learner_with_fewer_seeds_runs_a_prefix_of_the_full_plan():
    from dilm_ray.evaluation.job import plan_for_learners

    groups = {("dilm", 10): ["s0", "s1"], ("k_centers", 10): ["s0", "s1"]}
    plan = plan_for_learners(groups, ["minilm-l6", "smollm2-135m"], 2, 3, {"smollm2-135m": 1}, 42)
    full = [r for r in plan if r.learner == "minilm-l6"]
    fewer = [r for r in plan if r.learner == "smollm2-135m"]
    assert len(full) == 2 * 2 * 3 and len(fewer) == 2 * 2 * 1
    key = lambda r: (r.method, r.dpc, r.set_index, r.seed)  # noqa: E731
    assert [key(r) for r in fewer] == [key(r) for r in full[: len(fewer)]]
    assert {(r.method, r.set_index) for r in fewer} == {(m, i) for m in ("dilm", "k_centers") for i in (0, 1)}


@pytest.mark.parametrize(
    "spec, message",
    [("smollm2-135m=0", "N >= 1"), ("smollm2-135m", "LEARNER=N"), ("tfidf-logreg=2", "'tfidf-logreg' is not evaluated")],
)
def test_bad_seed_specs_are_refused_with_the_spec(spec, message):
    with pytest.raises(UserError, match=message):
        benchmark_script("glue").parse_seeds((spec,), ["minilm-l6", "smollm2-135m"])


def test_seed_specs_map_learners_to_counts():
    assert benchmark_script("glue").parse_seeds(("smollm2-135m=1",), ["minilm-l6", "smollm2-135m"]) == {"smollm2-135m": 1}
