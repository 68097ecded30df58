"""One evaluation protocol per learner family: resolution, keys, and which layers train."""

import numpy as np
import pytest
import torch

from dilm_ray.config import load_config
from dilm_ray.data import BUILTIN_TASKS, load_data
from dilm_ray.evaluation.job import eval_key
from dilm_ray.evaluation.learners import SCRATCH, TFIDF, build, family_config
from dilm_ray.evaluation.train_eval import train_learner
from dilm_ray.models.blocks import train_top_blocks, transformer_blocks

SST2 = BUILTIN_TASKS["sst2"]


@pytest.fixture
def cfg(tiny_overrides):
    return load_config("configs/sst2-cpu.yaml", tiny_overrides + ["evaluate.steps=4", "evaluate.lr=1e-2", "precision=fp32"])


def test_each_family_gets_its_own_protocol(cfg, tiny_lm_dir, tiny_bert_dir):
    decoder = family_config(cfg, str(tiny_lm_dir))
    d = cfg.evaluate.decoder
    assert (decoder.evaluate.lr, decoder.evaluate.train_top_layers, decoder.learner.pooling) == (d.lr, d.train_top_layers, d.pooling)
    assert decoder.evaluate.steps == cfg.evaluate.steps  # a field the family leaves None follows evaluate.steps
    assert family_config(cfg, SCRATCH).evaluate.lr == cfg.evaluate.scratch.lr != cfg.evaluate.lr
    # the encoder family sets nothing by default: the config itself (the paper's protocol)
    assert family_config(cfg, str(tiny_bert_dir)) is cfg and family_config(cfg, TFIDF) is cfg
    tuned = load_config("configs/sst2-cpu.yaml", ["evaluate.encoder.steps=9", "evaluate.decoder.pooling=last"])
    assert family_config(tuned, "minilm-l6").evaluate.steps == 9
    assert family_config(tuned, "smollm2-135m").learner.pooling == "last"


def test_eval_key_follows_the_family_protocol_only(cfg, tiny_lm_dir, tiny_bert_dir):
    data = load_data(cfg)
    key = lambda c, name: eval_key(c, data.task, data.validation, name)  # noqa: E731
    other_decoder = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"decoder": cfg.evaluate.decoder.model_copy(update={"lr": 3e-3})})})
    assert key(other_decoder, str(tiny_lm_dir)) != key(cfg, str(tiny_lm_dir))
    assert key(other_decoder, str(tiny_bert_dir)) == key(cfg, str(tiny_bert_dir))  # the encoder's runs stay valid
    # an encoder protocol equal to evaluate's own fields gives the key of the config without it
    same = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"encoder": cfg.evaluate.encoder.model_copy(update={"lr": cfg.evaluate.lr})})})
    assert key(same, str(tiny_bert_dir)) == key(cfg, str(tiny_bert_dir))


def test_recorded_minilm_key_is_unchanged():
    """The SST-2 bench record's MiniLM rows were keyed before family protocols existed: they stay valid."""
    import csv
    from pathlib import Path

    record = Path("benchmarks/results/sst2-bench/bench-cpu-dpc10/runs.csv")
    data_dir = Path("../shared/data/glue/sst2")
    if not data_dir.is_dir():
        pytest.skip("the GLUE copy is not beside the checkout")
    cfg = load_config("configs/bench/sst2.yaml")
    data = load_data(cfg)
    recorded = {r["eval_key"] for r in csv.DictReader(record.open()) if r["learner"] == "minilm-l6" and r["method"] != "full_data"}
    assert recorded == {eval_key(cfg, data.task, data.validation, "minilm-l6")}


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_train_top_blocks_freezes_all_but_the_top(tiny_lm_dir):
    from transformers import AutoModel

    body = AutoModel.from_pretrained(tiny_lm_dir)
    assert train_top_blocks(body, 0) == [] and not any(p.requires_grad for p in body.parameters())
    trainable = {id(p) for p in train_top_blocks(body, 1)}
    top = {id(p) for p in transformer_blocks(body)[-1].parameters()} | {id(p) for p in body.norm.parameters()}
    assert trainable == top == {id(p) for p in body.parameters() if p.requires_grad}
    assert len(train_top_blocks(body, None)) == len(list(body.parameters())) and all(p.requires_grad for p in body.parameters())


@pytest.mark.parametrize("top", [0, 1])
def test_decoder_learner_trains_only_head_and_top_blocks(cfg, toy_sets, tiny_lm_dir, top):
    train, _ = toy_sets
    name = str(tiny_lm_dir)
    resolved = family_config(load_config("configs/sst2-cpu.yaml", [*_tiny(cfg), f"evaluate.decoder.train_top_layers={top}"]), name)
    learner = build(name, resolved, SST2, seed=0)
    before, head = _params(learner.model.body), learner.model.head.weight.detach().clone()
    train_learner(learner, train.select(np.arange(16)), resolved.evaluate, seed=0, precision="fp32")
    after = _params(learner.model.body)
    blocks = transformer_blocks(learner.model.body)
    top_names = {f"layers.{len(blocks) - 1}.", "norm."} if top else set()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(k.startswith(t) for t in top_names) for k in changed) if top else changed == set()
    assert not torch.equal(head, learner.model.head.weight)  # the head always trains
    # a later run with every layer trainable is not held back by the earlier freeze
    everything = family_config(load_config("configs/sst2-cpu.yaml", [*_tiny(cfg), "evaluate.decoder.train_top_layers=null"]), name)
    train_learner(learner, train.select(np.arange(16)), everything.evaluate, seed=0, precision="fp32")
    assert all(not torch.equal(before[k], v) for k, v in _params(learner.model.body).items() if k.startswith("layers.0."))


def _tiny(cfg) -> list[str]:
    """The overrides that rebuild ``cfg`` (its paths and sizes) for another protocol."""
    return [f"data.path={cfg.data.path}", f"learner.model={cfg.learner.model}", f"output_dir={cfg.output_dir}", "name=t", "tracking.enabled=false",
            "learner.max_length=16", "evaluate.steps=4", "evaluate.lr=1e-2", "evaluate.decoder.lr=1e-2", "precision=fp32", "threads=1"]


def test_linear_probe_runs_the_frozen_body_once_per_batch_of_rows(cfg, toy_sets, tiny_lm_dir, monkeypatch):
    """With the body frozen its features are computed once, not at each of the steps; the
    head still trains on them with the same seeded batches (same result twice)."""
    train, _ = toy_sets
    name = str(tiny_lm_dir)
    resolved = family_config(load_config("configs/sst2-cpu.yaml", [*_tiny(cfg), "evaluate.decoder.train_top_layers=0", "evaluate.steps=6"]), name)
    learner = build(name, resolved, SST2, seed=0)
    calls = []
    forward = learner.model.body.forward
    monkeypatch.setattr(learner.model.body, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    rows = train.select(np.arange(16))
    train_learner(learner, rows, resolved.evaluate, seed=0, precision="fp32")
    assert len(calls) == -(-len(rows) // learner.embed_batch_size) < resolved.evaluate.steps
    head = learner.model.head.weight.detach().clone()
    train_learner(learner, rows, resolved.evaluate, seed=0, precision="fp32")
    assert torch.equal(head, learner.model.head.weight)


def test_full_data_row_trains_its_own_steps_in_every_family(cfg):
    from dilm_ray.evaluation.job import FULL_DATA, protocol_config

    tuned = load_config("configs/sst2-cpu.yaml", ["evaluate.decoder.steps=9", "evaluate.full_data_steps=33"])
    assert family_config(protocol_config(tuned, "dilm"), "smollm2-135m").evaluate.steps == 9
    full = family_config(protocol_config(tuned, FULL_DATA), "smollm2-135m")
    assert full.evaluate.steps == 33 and full.evaluate.lr == tuned.evaluate.decoder.lr


def test_body_fraction_keeps_the_first_blocks_and_rebuilds_the_cached_learner(cfg, toy_sets, tiny_lm_dir):
    from dilm_ray.evaluation.learners import evaluate_learner

    train, val = toy_sets
    name = str(tiny_lm_dir)
    cut = load_config("configs/sst2-cpu.yaml", [*_tiny(cfg), "evaluate.decoder.body_fraction=0.6", "evaluate.decoder.train_top_layers=0"])
    learner = build(name, family_config(cut, name), SST2, seed=0)
    assert len(transformer_blocks(learner.model.body)) == 2 == learner.model.body.config.num_hidden_layers  # round(0.6 x 3)
    assert learner.body_fraction == 0.6
    cache: dict = {}
    evaluate_learner(name, train.select(np.arange(8)), val, cut, SST2, seed=0, cache=cache)
    assert cache[name].body_fraction == 0.6 and len(transformer_blocks(cache[name].model.body)) == 2
    whole = load_config("configs/sst2-cpu.yaml", [*_tiny(cfg), "evaluate.decoder.body_fraction=null"])
    evaluate_learner(name, train.select(np.arange(8)), val, whole, SST2, seed=0, cache=cache)
    assert len(transformer_blocks(cache[name].model.body)) == 3 and cache[name].body_fraction is None
