"""Log and checkpoint intervals fire at the first step at or past each multiple (``crossed``),
also when a loop's step advances by more than one (stage 2: ``distill.inner_loop`` a loop)."""

import pytest

from dilm_ray.config import load_config
from dilm_ray.data import load_data
from dilm_ray.models.generator import build_generator
from dilm_ray.models.learner import build_learner
from dilm_ray.train.distill import DistillInputs, distill
from dilm_ray.train.state import crossed


def fired(steps: list[int], every: int, start: int = 0) -> list[int]:
    """The steps of ``steps`` (ascending, after ``start``) at which ``crossed`` fires."""
    previous, out = start, []
    for step in steps:
        if crossed(previous, step, every):
            out.append(step)
        previous = step
    return out


def test_steps_of_three_with_an_interval_of_five_fire_once_per_multiple():
    assert fired(list(range(3, 31, 3)), 5) == [6, 12, 15, 21, 27, 30]  # the modulo test: [15, 30]


def test_unit_steps_agree_with_the_modulo_test():
    assert fired(list(range(1, 40)), 7) == [s for s in range(1, 40) if s % 7 == 0]


@pytest.mark.parametrize("inner_loop, every", [(2, 4), (3, 9), (5, 5), (4, 1)])
def test_an_inner_loop_dividing_the_interval_agrees_with_the_modulo_test(inner_loop, every):
    steps = list(range(inner_loop, 50, inner_loop))
    assert fired(steps, every) == [s for s in steps if s % every == 0]


def test_a_resumed_loop_counts_from_its_resume_step():
    assert fired([12, 15, 18], 5, start=9) == [12, 15]
    assert not crossed(10, 10, 5)  # no step taken, nothing crossed


class Recorder:
    def __init__(self):
        self.steps = []

    def log(self, metrics, step):
        self.steps.append(step)


def test_stage_2_logs_at_the_first_step_past_each_multiple_of_log_every(tiny_overrides):
    cfg = load_config("configs/sst2-cpu.yaml", [*tiny_overrides, "distill.inner_loop=3", "distill.log_every=5", "distill.steps=15"])
    data = load_data(cfg, need_validation=False)
    gen = build_generator(cfg.generator, data.task)
    learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed)
    logger, callbacks = Recorder(), []
    distill(gen, learner, DistillInputs(data.train, cfg.distill, cfg.generator, cfg.seed), logger=logger,
            on_outer_loop=lambda st, m: callbacks.append((st.step, bool(m))))
    assert logger.steps == [6, 12, 15]  # the modulo test logged at 15 only
    assert callbacks == [(3, False), (6, True), (9, False), (12, True), (15, True)]
