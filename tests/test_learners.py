import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dilm_ray.evaluation.learners as learners
from dilm_ray.config import DataConfig, load_config
from dilm_ray.data import BUILTIN_TASKS, TextSet, load_split, resolve_task
from dilm_ray.evaluation.learners import (
    SCRATCH,
    TFIDF,
    ScratchLearner,
    describe,
    evaluate_learner,
    joined_texts,
    tfidf_predict,
)
from dilm_ray.families import LEARNER_KINDS

SST2 = BUILTIN_TASKS["sst2"]
MNLI = BUILTIN_TASKS["mnli"]
QQP = BUILTIN_TASKS["qqp"]


@pytest.fixture
def toy_pair(toy_pair_dir):
    cfg = DataConfig(task="mnli", path=str(toy_pair_dir))
    task = resolve_task(cfg)
    return load_split(cfg, task, "train"), load_split(cfg, task, task.validation_split)


@pytest.fixture
def cfg(tiny_overrides):
    return load_config("configs/sst2-cpu.yaml", tiny_overrides + ["learner.max_length=16", "evaluate.steps=3", "evaluate.batch_size=8"])


def test_describe_families(tiny_bert_dir, tiny_lm_dir):
    assert describe("minilm-l6") == "encoder"
    assert describe("smollm2-135m") == "decoder"
    assert describe(SCRATCH) == "scratch-transformer"
    assert describe(TFIDF) == "tfidf-logreg"
    assert describe(str(tiny_bert_dir)) == "encoder"
    assert describe(str(tiny_lm_dir)) == "decoder"  # a llama config: last-token pooling
    assert describe("some-org/some-model") == "hub/local"
    assert {name: describe(name) for name in LEARNER_KINDS} == LEARNER_KINDS
    assert describe("icl:smollm2-135m") == "icl"


def test_every_family_protocol_is_an_evaluate_section():
    from dilm_ray.config import EvaluateConfig
    from dilm_ray.families import FAMILIES, PROTOCOL_SECTIONS

    assert PROTOCOL_SECTIONS == ("encoder", "decoder", "scratch")
    assert all(section in EvaluateConfig.model_fields for section in PROTOCOL_SECTIONS)
    assert {f.section for f in FAMILIES.values()} == {*PROTOCOL_SECTIONS, None}


def test_pair_texts_are_joined_with_sep():
    data = TextSet(("premise", "hypothesis"), (("a cat", "an animal"),), np.array([0]))
    assert joined_texts(data) == ["a cat [SEP] an animal"]
    assert joined_texts(TextSet(("sentence",), (("just one",),), np.array([1]))) == ["just one"]


def test_tfidf_learns_toy_task_and_is_exactly_reproducible(toy_sets, cfg):
    train, val = toy_sets
    first = evaluate_learner(TFIDF, train, val, cfg, SST2, seed=3)
    assert set(first) == {"accuracy", "score", "seconds"}
    assert first["accuracy"] > 0.9 and first["score"] == first["accuracy"]
    second = evaluate_learner(TFIDF, train, val, cfg, SST2, seed=3)
    first.pop("seconds"), second.pop("seconds")
    assert first == second


def test_tfidf_uses_the_training_labels(toy_sets, cfg):
    """Flipped training labels must flip the predictions: the model is fitted on ``train``."""
    train, val = toy_sets
    flipped = TextSet(train.columns, train.texts, 1 - train.labels)
    assert evaluate_learner(TFIDF, flipped, val, cfg, SST2, seed=0)["accuracy"] < 0.1


def test_tfidf_pair_task_and_accuracy_f1(toy_pair, cfg):
    train, val = toy_pair
    out = evaluate_learner(TFIDF, train, val, cfg, MNLI, seed=0)
    assert out["accuracy"] > 0.9
    qqp = evaluate_learner(TFIDF, train, val, cfg, QQP, seed=0)
    assert set(qqp) == {"accuracy", "f1", "score", "seconds"}
    assert qqp["score"] == pytest.approx((qqp["accuracy"] + qqp["f1"]) / 2)


def test_tfidf_degenerate_sets_predict_majority():
    val = TextSet(("sentence",), (("good film",), ("bad film",)), np.array([1, 0]))
    one_label = TextSet(("sentence",), (("good",), ("great",)), np.array([1, 1]))
    assert tfidf_predict(one_label, val, 0).tolist() == [1, 1]
    no_tokens = TextSet(("sentence",), (("a",), ("b",), ("c",)), np.array([0, 1, 0]))  # 1-char tokens are dropped
    assert tfidf_predict(no_tokens, val, 0).tolist() == [0, 0]


def test_tfidf_reproducible_across_processes(toy_sets, tmp_path):
    train, val = toy_sets
    script = (
        "import json, sys, numpy as np\n"
        "from dilm_ray.data import TextSet\n"
        "from dilm_ray.evaluation.learners import tfidf_predict\n"
        "d = json.load(open(sys.argv[1]))\n"
        "tr = TextSet(('sentence',), tuple(map(tuple, d['tx'])), np.array(d['ty']))\n"
        "va = TextSet(('sentence',), tuple(map(tuple, d['vx'])), np.array(d['vy']))\n"
        "print(json.dumps(tfidf_predict(tr, va, 5).tolist()))\n"
    )
    data = tmp_path / "d.json"
    data.write_text(json.dumps({"tx": train.texts, "ty": train.labels.tolist(), "vx": val.texts, "vy": val.labels.tolist()}))
    out = subprocess.run([sys.executable, "-c", script, str(data)], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert json.loads(out.stdout.strip().splitlines()[-1]) == tfidf_predict(train, val, 5).tolist()


def test_neural_learner_uses_cache_and_is_reproducible(toy_sets, cfg, tiny_bert_dir, monkeypatch):
    train, val = toy_sets
    builds = []
    real = learners.build_learner

    def counting(*args, **kwargs):
        builds.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(learners, "build_learner", counting)
    cache: dict = {}
    name = str(tiny_bert_dir)
    small, val = train.select(range(16)), val.select(range(16))
    first = evaluate_learner(name, small, val, cfg, SST2, seed=1, cache=cache)
    second = evaluate_learner(name, small, val, cfg, SST2, seed=1, cache=cache)
    assert len(builds) == 1 and list(cache) == [name]
    assert set(first) == {"accuracy", "score", "seconds"} and first["score"] == first["accuracy"]
    assert first["accuracy"] * len(val) == pytest.approx(round(first["accuracy"] * len(val)))  # the share of the 16 validation rows predicted right
    first.pop("seconds"), second.pop("seconds")
    assert first == second  # same process, same threads: the cached learner is reset to the seed
    # a task with another label count needs another head: rebuilt, not reused
    evaluate_learner(name, small, val, cfg, MNLI, seed=1, cache=cache)
    assert len(builds) == 2 and cache[name].model.head.out_features == 3
    # without a cache every call builds
    evaluate_learner(name, small, val, cfg, SST2, seed=1)
    assert len(builds) == 3


def test_tfidf_builds_nothing(toy_sets, cfg, monkeypatch):
    monkeypatch.setattr(learners, "build_learner", lambda *a, **k: pytest.fail("tfidf must not build a neural model"))
    cache: dict = {}
    evaluate_learner(TFIDF, *toy_sets, cfg, SST2, seed=0, cache=cache)
    assert cache == {}


@pytest.fixture(scope="module")
def scratch():
    from dilm_ray.config import LearnerConfig

    return learners.build_scratch(LearnerConfig(max_length=32), num_labels=2, seed=0)


def _body(learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.model.body.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_scratch_architecture_and_tokenizer(scratch):
    assert isinstance(scratch, ScratchLearner)
    conf = scratch.model.body.config
    assert (conf.num_hidden_layers, conf.hidden_size, conf.num_attention_heads, conf.intermediate_size) == (2, 128, 2, 256)
    assert conf.vocab_size == len(scratch.tokenizer) == 30522  # the MiniLM (BERT uncased) wordpiece vocabulary
    assert scratch.model.pooling == "mean" and scratch.max_length == 32


@pytest.mark.integration
def test_scratch_reset_draws_body_from_seed(scratch):
    scratch.reset(0)
    a = _body(scratch)
    head_a = scratch.model.head.weight.clone()
    scratch.reset(1)
    b = _body(scratch)
    assert not _same(a, b) and not torch.equal(head_a, scratch.model.head.weight)
    with torch.no_grad():  # training-like drift must be undone by reset
        for p in scratch.model.body.parameters():
            p.add_(1.0)
    scratch.reset(0)
    assert _same(a, _body(scratch)) and torch.equal(head_a, scratch.model.head.weight)
    emb = scratch.model.body.embeddings.word_embeddings.weight
    assert 0.015 < emb.std().item() < 0.025 and torch.count_nonzero(emb[scratch.tokenizer.pad_token_id]) == 0
    rng = torch.get_rng_state()
    scratch.reset(2)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is left alone


@pytest.mark.integration
def test_scratch_evaluate_via_cache(scratch, toy_sets, cfg, monkeypatch):
    train, val = toy_sets
    monkeypatch.setattr(learners, "build_scratch", lambda *a, **k: pytest.fail("cached scratch learner must be reused"))
    cache = {SCRATCH: scratch}
    out = evaluate_learner(SCRATCH, train.select(range(8)), val, cfg, SST2, seed=4, cache=cache)
    assert set(out) == {"accuracy", "score", "seconds"} and out["score"] == out["accuracy"]
    assert out["accuracy"] * len(val) == pytest.approx(round(out["accuracy"] * len(val)))  # a share of the rows
    assert cache[SCRATCH] is scratch
