"""Seeded regression of stages 3-4 and the coresets on the tiny models, fp32, one thread: the
texts synthesis samples, the rows each coreset picks, and one evaluation run's accuracy, pinned
(stages 1-2: ``tests/test_golden.py``). A change of sampling, selection (K-means, K-centers,
herding) or the evaluation protocol moves them: regenerate the constants only for an intended
change, and say which in the commit.
"""

import pytest
import torch

from dilm_ray.algorithm.selection import select_per_class
from dilm_ray.config import load_config
from dilm_ray.data import load_data
from dilm_ray.evaluation.learners import evaluate_learner
from dilm_ray.models.generator import build_generator
from dilm_ray.models.learner import build_learner
from dilm_ray.train.synthesize import synthesize

GOLDEN_SYNTHESIS = [  # set 0 of DPC 2 from the untrained tiny generator: the texts its sampled token ids decode to
    ["story great fun the awful and and happy happy happy"],
    ["strong weak but movie awful story quite terrible great strong"],
    ["story quite pretty great"],
    ["boring ugly dull a boring bad movie weak fast the"],
]
GOLDEN_CORESETS = {"random": [88, 38, 186, 91, 31, 181], "k_centers": [48, 50, 0, 107, 97, 61], "herding": [146, 174, 82, 107, 105, 13]}
GOLDEN_ACCURACY = 0.65  # 39 of the 60 toy validation rows after 8 steps: mid-learning, so a protocol change moves it


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _made(tiny_overrides):
    cfg = load_config("configs/sst2-cpu.yaml", [*tiny_overrides, "precision=fp32", "evaluate.steps=8", "evaluate.lr=1e-3"])
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    gen = build_generator(cfg.generator, data.task)
    learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed)
    sets, _ = synthesize(gen, learner, cfg.synthesize, cfg.generator, 2, cfg.seed, progress=False)
    embeddings = learner.embed(data.train)
    coresets = {m: select_per_class(embeddings, data.train.labels, 3, m, seed=0).tolist() for m in ("random", "k_centers", "herding")}
    scored = evaluate_learner(cfg.learner.model, data.train, data.validation, cfg, data.task, cfg.seed)  # enough rows to learn from
    return [list(row) for row in sets[0].texts], coresets, scored["accuracy"]


def test_synthesis_coresets_and_an_evaluation_run_match_the_pinned_values(tiny_overrides, one_thread):
    texts, coresets, accuracy = _made(tiny_overrides)
    assert texts == GOLDEN_SYNTHESIS
    assert coresets == GOLDEN_CORESETS
    assert accuracy == pytest.approx(GOLDEN_ACCURACY, abs=1e-9)
