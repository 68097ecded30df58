import numpy as np
import pytest
import torch

from dilm_ray.config import DataConfig, DistillConfig, GeneratorConfig, LearnerConfig
from dilm_ray.data import BUILTIN_TASKS, load_split, resolve_task
from dilm_ray.models.generator import build_generator
from dilm_ray.models.learner import build_learner
from dilm_ray.train.distill import Cycle, DistillInputs, cluster_batches, distill, matching_step, pool_batches, representative_teachers
from dilm_ray.train.gradients import full_grads, head_grads

SST2 = BUILTIN_TASKS["sst2"]


@pytest.fixture
def learner(tiny_bert_dir):
    return build_learner(LearnerConfig(model=str(tiny_bert_dir), max_length=16), 2, seed=0)


@pytest.fixture
def train(toy_data_dir):
    cfg = DataConfig(path=str(toy_data_dir))
    return load_split(cfg, resolve_task(cfg), "train")


def test_embed_returns_rows_in_input_order_despite_length_batching(learner, train):
    learner.embed_batch_size = 7  # several batches, each re-ordered by length
    together = learner.embed(train.select(range(30)))
    one_by_one = torch.cat([learner.embed(train.select([i])) for i in range(30)])
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_head_gradients_equal_the_head_part_of_full_gradients(learner, train):
    batch = train.select(range(6))
    head = head_grads(learner, batch)
    full = full_grads(learner, batch)
    n_head = head.shape[1]
    # the head's weight and bias are the last parameters of the classifier
    assert torch.allclose(full[:, -n_head:], head, atol=1e-5)


def test_learner_reset_restores_body_and_seeds_head(learner):
    body = {k: v.clone() for k, v in learner.model.body.state_dict().items()}
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(1.0)
    learner.reset(5)
    head5 = learner.model.head.weight.clone()
    assert all(torch.equal(v, learner.model.body.state_dict()[k]) for k, v in body.items())
    learner.reset(6)
    assert not torch.equal(head5, learner.model.head.weight)
    learner.reset(5)
    assert torch.equal(head5, learner.model.head.weight)


def test_representative_teachers_and_cluster_batches():
    emb = torch.cat([torch.zeros(10, 2), torch.full((10, 2), 5.0)]) + 0.01 * torch.arange(20.0)[:, None]
    labels = np.array([0] * 10 + [1] * 10)
    teachers = representative_teachers(emb, labels, 2, n_sets=2, dpc=3, seed=0)
    assert all(len(t) == 6 for t in teachers)
    assert set(teachers[0]) <= set(range(10)) and set(teachers[1]) <= set(range(10, 20))
    assign = torch.tensor([0, 0, 1, 1, 1, 2])
    batches = cluster_batches(assign, 3, n_batches=3, seed=0)
    for b in batches:
        assert sorted(assign[b].tolist()) == [0, 1, 2]  # one sample per cluster
    assert sorted(b[2] for b in batches) == [5, 5, 5]


def test_pool_batches_take_one_row_per_cluster_and_only_consistent_rows_under_the_filter():
    emb = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 12 + [1] * 12)
    plain = pool_batches(emb, labels, 2, k=3, n_batches=4, seed=0)
    assert [len(b) for b in plain] == [4, 4] and all(len(batch) == 3 for b in plain for batch in b)
    assert {i for b in plain[0] for i in b} <= set(range(12)) and {i for b in plain[1] for i in b} <= set(range(12, 24))
    assert len({i for b in plain[0] for i in b}) > 4  # rows the filter would drop are drawn too
    # the reference classifier finds rows 0-3 and 12-15 consistent with their label, the rest not
    proba = torch.zeros(24, 2)
    proba[:, 0] = torch.tensor([0.9] * 4 + [0.1] * 8 + [0.1] * 4 + [0.9] * 8)
    proba[:, 1] = 1 - proba[:, 0]
    kept = pool_batches(emb, labels, 2, k=3, n_batches=4, seed=0, proba=proba)
    assert {i for b in kept[0] for i in b} == {0, 1, 2, 3} and {i for b in kept[1] for i in b} == {12, 13, 14, 15}
    # a label with fewer consistent rows than clusters is topped up with its least wrong rows
    proba[:4, 0], proba[:4, 1] = 0.4, 0.6
    proba[4, 0], proba[4, 1] = 0.45, 0.55
    topped = pool_batches(emb, labels, 2, k=3, n_batches=2, seed=0, proba=proba)
    assert 4 in {i for b in topped[0] for i in b}


def test_matching_steps_raise_gradient_similarity(tiny_lm_dir, learner, train):
    """With fixed real and synthetic batches, optimising the generator through the loss weights
    must raise the similarity: proof that the matching gradient reaches the generator."""
    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=12), SST2)
    cfg = DistillConfig(steps=2, inner_loop=1, lm_lambda=0.0)
    real = [train.select(train.indices_of(y)[:8]) for y in (0, 1)]
    # a synthetic batch mixing correctly and wrongly labelled text: weights decide the gradient
    syn_idx = np.concatenate([train.indices_of(0)[8:12], train.indices_of(1)[8:12]])
    syn = train.select(syn_idx)
    syn = type(syn)(syn.columns, syn.texts, np.array([0, 0, 1, 1, 1, 1, 0, 0]))
    opt = torch.optim.Adam(gen.model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in gen.model.parameters()]
    sims = []
    for _ in range(30):
        metrics = matching_step(gen, learner, real, syn, cfg, train, Cycle(np.arange(4), 2, np.random.default_rng(0)))
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.model.parameters())
        opt.step()
        opt.zero_grad()
        sims.append(metrics["grad_sim"])
    assert 1 - sims[-1] < 0.8 * (1 - sims[0])  # the matching loss drops by over 20%
    assert any(not torch.equal(a, b) for a, b in zip(before, gen.model.parameters()))


def test_distill_runs_outer_loops_and_changes_the_generator(tiny_lm_dir, learner, train):
    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=12), SST2)
    before = [p.detach().clone() for p in gen.model.parameters()]
    cfg = DistillConfig(
        steps=4, inner_loop=2, learner_steps=1, learner_batch_size=8, n_repset=1, repset_dpc=4, gm_real_dpc=4,
        gm_real_accum=1, gm_syn_dpc=2, generate_interval=1, lr=1e-3, log_every=2,
    )
    seen = []
    state = distill(gen, learner, DistillInputs(train, cfg, GeneratorConfig(max_length=12), seed=0), on_outer_loop=lambda s, m: seen.append((s.step, m)))
    assert state.step == 4 and [s for s, _ in seen] == [2, 4]
    # the matching loss is 1 - the mean per-label cosine similarity (DiLM Eq. 3 with L labels)
    assert all(m["match_loss"] == pytest.approx(1 - m["grad_sim"], abs=1e-6) and m["match_loss"] > 0 for _, m in seen)
    assert any(not torch.equal(a, b) for a, b in zip(before, gen.model.parameters()))


def test_distill_is_reproducible(tiny_lm_dir, tiny_bert_dir, train):
    def once():
        gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=12), SST2)
        learner = build_learner(LearnerConfig(model=str(tiny_bert_dir), max_length=16), 2, seed=0)
        cfg = DistillConfig(steps=2, inner_loop=2, learner_steps=1, learner_batch_size=8, n_repset=1, repset_dpc=4, gm_real_dpc=4, gm_real_accum=1, gm_syn_dpc=2, generate_interval=1, lr=1e-3)
        logs = []
        distill(gen, learner, DistillInputs(train, cfg, GeneratorConfig(max_length=12), seed=3), on_outer_loop=lambda s, m: logs.append(m))
        return logs, [p.detach().clone() for p in gen.model.parameters()]

    def without_timings(logs):
        return [{k: v for k, v in m.items() if not k.startswith("seconds_")} for m in logs]

    (logs_a, params_a), (logs_b, params_b) = once(), once()
    assert without_timings(logs_a) == without_timings(logs_b)
    assert all({"seconds_generate", "seconds_match", "seconds_inner_loop"} <= m.keys() for m in logs_a)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_distill_with_the_label_filter_logs_the_consistent_fraction_and_trains(tiny_lm_dir, learner, train):
    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=12), SST2)
    before = [p.detach().clone() for p in gen.model.parameters()]
    cfg = DistillConfig(
        steps=2, inner_loop=2, learner_steps=1, learner_batch_size=8, n_repset=1, repset_dpc=4, gm_real_dpc=4,
        gm_real_accum=1, gm_syn_dpc=2, generate_interval=1, lr=1e-3, label_filter=True,
    )
    seen = []
    distill(gen, learner, DistillInputs(train, cfg, GeneratorConfig(max_length=12), seed=0), on_outer_loop=lambda s, m: seen.append(m))
    assert 0.0 <= seen[0]["pool_consistent"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, gen.model.parameters()))


def test_the_label_filter_keys_stage_2_only_when_on(tiny_overrides):
    from dilm_ray.config import load_config
    from dilm_ray.keys import content_key
    from dilm_ray.pipeline.base import pretrain_key
    from dilm_ray.pipeline.table import STAGES

    off = load_config("configs/sst2-cpu.yaml", tiny_overrides)
    on = load_config("configs/sst2-cpu.yaml", [*tiny_overrides, "distill.label_filter=true"])
    keys = {stage.name: stage for stage in STAGES}
    # off, the key is the one made before the setting existed: finished stage-2 runs stay valid
    distill = {**off.distill.model_dump(mode="json", exclude={"log_every", "checkpoint_every", "label_filter"}), "repset_pool": None}  # as it was then
    before = content_key(pretrain_key(off), off.learner.model_dump(mode="json"), distill)
    assert keys["distill"].key(off) == before
    for name in ("distill", "synthesize_dilm", "synthesize_dilm_filtered"):
        assert keys[name].key(on) != keys[name].key(off), name
    assert keys["pretrain"].key(on) == keys["pretrain"].key(off)
