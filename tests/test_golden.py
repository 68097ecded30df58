"""Seeded regression: the losses of a few stage-1 and stage-2 steps of the tiny models, pinned.

fp32, one thread, fixed seeds. The tolerance (1e-4 relative) is far below what any change of
the algorithm moves: a flipped sign of the matching loss, another softmax temperature or
another label token changes these values in the second decimal. Regenerate the constants only
for an intended change of the algorithm, and say which in the commit.
"""

import pytest
import torch

from dilm_ray.config import load_config
from dilm_ray.data import load_data
from dilm_ray.models.generator import build_generator
from dilm_ray.models.learner import build_learner
from dilm_ray.train.distill import DistillInputs, distill
from dilm_ray.train.pretrain import pretrain

GOLDEN_PRETRAIN = {1: 3.6993281841278076, 2: 3.5835812091827393, 3: 3.464463472366333, 4: 3.3709869384765625}
GOLDEN_DISTILL = {
    2: {"match_loss": 0.11106117069721222, "grad_sim": 0.888938844203949, "syn_lm_loss": 3.3686740398406982},
    4: {"match_loss": 0.060692667961120605, "grad_sim": 0.9393073320388794, "syn_lm_loss": 3.3462318181991577},
}


class Recorder:
    def __init__(self):
        self.rows = {}

    def log(self, metrics, step):
        self.rows[step] = dict(metrics)


def _losses(tiny_overrides, extra=()):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config("configs/sst2-cpu.yaml", [*tiny_overrides, "pretrain.steps=4", "pretrain.log_every=1", "pretrain.lr=1e-2",
                                                     "distill.steps=4", "distill.log_every=2", "distill.temperature=0.5", *extra])
        data = load_data(cfg, need_validation=False)
        torch.manual_seed(cfg.seed)
        gen = build_generator(cfg.generator, data.task)
        stage1, stage2 = Recorder(), Recorder()
        pretrain(gen, data.train, cfg.pretrain, cfg.generator, cfg.seed, logger=stage1)
        learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed)
        distill(gen, learner, DistillInputs(data.train, cfg.distill, cfg.generator, cfg.seed), logger=stage2)
    finally:
        torch.set_num_threads(threads)
    pre = {step: m["lm_loss"] for step, m in stage1.rows.items()}
    dis = {step: {k: m[k] for k in ("match_loss", "grad_sim", "syn_lm_loss")} for step, m in stage2.rows.items()}
    return pre, dis


def test_stage1_and_stage2_losses_match_the_pinned_values(tiny_overrides):
    pre, dis = _losses(tiny_overrides)
    assert pre == pytest.approx(GOLDEN_PRETRAIN, rel=1e-4)
    assert dis == {step: pytest.approx(values, rel=1e-4) for step, values in GOLDEN_DISTILL.items()}


def test_the_tolerance_sees_a_change_of_temperature(tiny_overrides):
    _, dis = _losses(tiny_overrides, ["distill.temperature=1.0"])
    assert dis[4]["match_loss"] != pytest.approx(GOLDEN_DISTILL[4]["match_loss"], rel=1e-4)
