"""bf16 mixed precision: what runs in bf16, what stays fp32, and the keys that see it."""

import numpy as np
import pytest
import torch

from dilm_ray import precision
from dilm_ray.algorithm.matching import per_sample_head_grads
from dilm_ray.config import DistillConfig, GeneratorConfig, LearnerConfig, PretrainConfig, load_config
from dilm_ray.models.blocks import transformer_blocks
from dilm_ray.models.generator import build_generator
from dilm_ray.models.learner import build_learner
from dilm_ray.train.distill import DistillInputs, distill
from dilm_ray.train.gradients import head_grads
from dilm_ray.train.pretrain import pretrain
from dilm_ray.train.runtime import Runtime

BF16 = Runtime(precision="bf16")


def test_auto_resolves_to_bf16_on_gpu_workers_and_passes_explicit_values_through(monkeypatch):
    assert precision.resolve("auto", use_gpu=True) == "bf16"
    assert precision.resolve("fp32", use_gpu=True) == "fp32"
    assert precision.resolve("bf16", use_gpu=False) == "bf16"
    monkeypatch.setattr(precision, "cpu_bf16", lambda: False)
    assert precision.resolve("auto", use_gpu=False) == "fp32"
    monkeypatch.setattr(precision, "cpu_bf16", lambda: True)
    assert precision.resolve("auto", use_gpu=False) == "bf16"
    # the config holds the resolved value, so keys and records name what ran
    assert load_config(None, ["ray.use_gpu=true"]).precision == "bf16"
    assert load_config(None, ["precision=fp32", "ray.use_gpu=true"]).precision == "fp32"


def _tiny(tiny_lm_dir, toy_sets, top_layers):
    from dilm_ray.data import BUILTIN_TASKS

    gen_cfg = GeneratorConfig(model=str(tiny_lm_dir), max_length=12, train_top_layers=top_layers)
    return build_generator(gen_cfg, BUILTIN_TASKS["sst2"]), gen_cfg


class Losses:
    def __init__(self):
        self.values = []

    def log(self, metrics, step):
        self.values.append(metrics["lm_loss"])


def test_bf16_stage1_holds_frozen_blocks_in_bf16_trains_fp32_masters_and_tracks_fp32_losses(tiny_lm_dir, toy_sets):
    train, _ = toy_sets
    cfg = PretrainConfig(steps=4, batch_size=8, lr=1e-2, log_every=1)
    runs = {}
    for runtime in (Runtime(), BF16):
        torch.manual_seed(0)
        gen, gen_cfg = _tiny(tiny_lm_dir, toy_sets, top_layers=1)
        frozen_before = transformer_blocks(gen.model)[0].self_attn.q_proj.weight.detach().clone()
        top_before = transformer_blocks(gen.model)[-1].mlp.up_proj.weight.detach().clone()
        losses = Losses()
        pretrain(gen, train, cfg, gen_cfg, seed=0, runtime=runtime, logger=losses)
        runs[runtime.precision] = losses.values
        frozen = transformer_blocks(gen.model)[0].self_attn.q_proj.weight
        top = transformer_blocks(gen.model)[-1].mlp.up_proj.weight
        assert top.dtype == torch.float32 and not torch.equal(top.detach(), top_before)  # fp32 master weights, trained
        if runtime.precision == "bf16":
            assert frozen.dtype == torch.bfloat16
            assert torch.equal(frozen.float(), frozen_before.bfloat16().float())  # rounded once, never trained
            assert gen.model.get_input_embeddings().weight.dtype == torch.bfloat16  # the table is frozen ...
            assert gen.label_rows.dtype == torch.float32  # ... its label rows train in fp32
    assert all(np.isfinite(runs["bf16"]))
    # autocast really ran (bf16 products move the losses) and stays within bf16's rounding of fp32
    assert runs["bf16"] != runs["fp32"]
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=2e-2)


def test_head_gradients_and_lm_losses_stay_fp32_under_autocast(tiny_lm_dir, tiny_bert_dir, toy_sets):
    train, _ = toy_sets
    learner = build_learner(LearnerConfig(model=str(tiny_bert_dir), max_length=16), 2, seed=0)
    batch = train.select(range(8))
    with BF16.autocast():
        grads = head_grads(learner, batch)
        learner.model.eval()
        with torch.no_grad():
            features = learner.model.features(**learner.batch(batch))
    with torch.no_grad():
        assert not torch.allclose(features.float(), learner.model.features(**learner.batch(batch)), atol=1e-4)  # the body ran in bf16 ...
    labels = torch.as_tensor(batch.labels)
    exact = per_sample_head_grads(features.float(), labels, learner.model.head.weight.detach(), learner.model.head.bias.detach())
    assert grads.dtype == torch.float32
    assert torch.allclose(grads, exact, rtol=1e-6, atol=1e-7)  # ... the head gradient from its features in fp32
    gen, _ = _tiny(tiny_lm_dir, toy_sets, top_layers=None)
    with BF16.autocast():
        losses = gen.lm_losses(batch)
    assert losses.dtype == torch.float32
    assert torch.allclose(losses, gen.lm_losses(batch), rtol=2e-2)


def test_bf16_stage2_trains_the_generator_with_finite_matching_losses(tiny_lm_dir, tiny_bert_dir, toy_sets):
    train, _ = toy_sets
    gen, gen_cfg = _tiny(tiny_lm_dir, toy_sets, top_layers=1)
    learner = build_learner(LearnerConfig(model=str(tiny_bert_dir), max_length=16), 2, seed=0)
    cfg = DistillConfig(steps=4, inner_loop=2, learner_steps=1, learner_batch_size=8, n_repset=1, repset_dpc=4,
                        gm_real_dpc=4, gm_real_accum=1, gm_syn_dpc=2, generate_interval=1, lr=1e-3, log_every=2)
    top = transformer_blocks(gen.model)[-1].mlp.up_proj.weight
    before = top.detach().clone()
    rows = []
    distill(gen, learner, DistillInputs(train, cfg, gen_cfg, seed=0), runtime=BF16, on_outer_loop=lambda st, m: rows.append(m))
    assert top.dtype == torch.float32 and not torch.equal(top.detach(), before)
    assert transformer_blocks(gen.model)[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert all(np.isfinite([r["match_loss"], r["grad_sim"], r["syn_lm_loss"]]).all() for r in rows)


def test_precision_is_part_of_every_stage_and_evaluation_key_and_fp32_keys_are_unchanged(tiny_overrides):
    from dilm_ray.data import load_data
    from dilm_ray.evaluation.job import eval_key
    from dilm_ray.pipeline.table import STAGES

    fp32 = load_config("configs/sst2-cpu.yaml", [*tiny_overrides, "precision=fp32"])
    bf16 = load_config("configs/sst2-cpu.yaml", [*tiny_overrides, "precision=bf16"])
    for stage in STAGES:
        assert stage.key(fp32) != stage.key(bf16), stage.name
    data = load_data(fp32)
    assert eval_key(fp32, data.task, data.validation, "minilm-l6") != eval_key(bf16, data.task, data.validation, "minilm-l6")
    assert eval_key(fp32, data.task, data.validation, "tfidf-logreg") == eval_key(bf16, data.task, data.validation, "tfidf-logreg")
    assert precision.key_parts("fp32") == []  # keys made before precision was a setting are fp32 keys
