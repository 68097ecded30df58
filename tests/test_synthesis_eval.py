import numpy as np
import pytest
import torch

from dilm_ray.config import EvaluateConfig, GeneratorConfig, LearnerConfig, SynthesizeConfig, load_config
from dilm_ray.data import BUILTIN_TASKS, load_file
from dilm_ray.pipeline.evaluate import evaluate_groups
from dilm_ray.data import TaskData
from dilm_ray.evaluation.job import plan_jobs
from dilm_ray.evaluation.report import results_table, to_markdown
from dilm_ray.evaluation.stats import summarize, welch_ci, welch_p
from dilm_ray.evaluation.train_eval import scores, train_learner, predict
from dilm_ray.models.generator import build_generator
from dilm_ray.models.learner import build_learner
from dilm_ray.algorithm.selection import select_per_class
from dilm_ray.train.synthesize import synthesize
from tests.conftest import loaded_sets

SST2 = BUILTIN_TASKS["sst2"]


def test_synthesize_writes_dpc_per_class_sets(tiny_lm_dir, tiny_bert_dir, tmp_path):
    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=10), SST2)
    learner = build_learner(LearnerConfig(model=str(tiny_bert_dir), max_length=16), 2, seed=0)
    parse, calls, malformed = gen.parse, [], []

    def parse_some_malformed(ids):  # every 5th sample is malformed, besides any the tiny LM makes
        calls.append(1)
        texts = None if len(calls) % 5 == 0 else parse(ids)
        malformed.extend([1] if texts is None else [])
        return texts

    gen.parse = parse_some_malformed
    _, dropped = synthesize(gen, learner, SynthesizeConfig(n_datasets=2, over_sample_ratio=3), GeneratorConfig(max_length=10), dpc=3, seed=1, progress=False)
    gen.parse = parse
    assert dropped == len(malformed) >= len(calls) // 5 > 0
    sets, _ = synthesize(gen, learner, SynthesizeConfig(n_datasets=2, over_sample_ratio=3), GeneratorConfig(max_length=10), dpc=3, seed=0, progress=False)
    assert len(sets) == 2
    for s in sets:
        assert s.counts(2) == [3, 3] and all(t[0] for t in s.texts)
    assert sets[0].texts != sets[1].texts
    parquet, _ = sets[0].save(tmp_path)
    assert load_file(parquet, SST2).texts == sets[0].texts
    # set i depends only on its own seed: making set 1 alone (a resumed synthesis) gives the same set
    (again,), _ = synthesize(gen, learner, SynthesizeConfig(n_datasets=2, over_sample_ratio=3), GeneratorConfig(max_length=10), dpc=3, seed=0, indices=[1], progress=False)
    assert again.texts == sets[1].texts


def test_each_set_is_handed_over_before_the_next_is_made(tiny_lm_dir, tiny_bert_dir, monkeypatch):
    """An interruption during set 1 must not lose set 0 (MNLI sets take ~1-2 min each here)."""
    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=10), SST2)
    learner = build_learner(LearnerConfig(model=str(tiny_bert_dir), max_length=16), 2, seed=0)
    real_generate, saved = gen.generate_all, []

    def dies_on_second_pool(*args):
        if saved:
            raise KeyboardInterrupt
        return real_generate(*args)

    monkeypatch.setattr(gen, "generate_all", dies_on_second_pool)
    with pytest.raises(KeyboardInterrupt):
        synthesize(gen, learner, SynthesizeConfig(n_datasets=2, over_sample_ratio=3), GeneratorConfig(max_length=10), dpc=3, seed=0,
                   progress=False, on_set=lambda made: saved.append((made.index, made.subset)))
    assert [i for i, _ in saved] == [0] and saved[0][1].counts(2) == [3, 3]


def test_label_consistent_keeps_agreeing_rows_and_tops_up_a_short_label():
    from dilm_ray.algorithm.selection import label_consistent

    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # reference: row 1 looks positive; rows 3 and 4 look negative (row 4 less so)
    proba = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2], [0.8, 0.2], [0.6, 0.4], [0.1, 0.9]])
    assert label_consistent(labels, proba, 2).tolist() == [0, 2, 4, 5]  # label 1 topped up with row 4
    assert label_consistent(labels, proba, 1).tolist() == [0, 2, 5]
    assert label_consistent(labels, proba, 3).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="proba"):
        label_consistent(labels, proba[:4], 2)


def test_label_filter_selects_from_a_given_pool_only_rows_that_follow_their_label(tiny_lm_dir, tiny_bert_dir, monkeypatch):
    from dilm_ray.data.dataset import TextSet

    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=10), SST2)
    learner = build_learner(LearnerConfig(model=str(tiny_bert_dir), max_length=16), 2, seed=0)
    monkeypatch.setattr(gen, "generate_all", lambda *a: pytest.fail("a given pool must not be sampled again"))
    pool = TextSet(("sentence",), tuple((f"row {i}",) for i in range(12)), np.array([0] * 6 + [1] * 6))
    follows = np.array([1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0], dtype=bool)  # 4 of label 0 and 3 of label 1 follow

    def reference(embeddings):
        assert embeddings.shape == (12, learner.model.head.in_features)
        right = torch.as_tensor(np.where(follows, pool.labels, 1 - pool.labels))
        return torch.nn.functional.one_hot(right, 2).float()

    made = []
    cfg = SynthesizeConfig(n_datasets=1, over_sample_ratio=4)
    (subset,), _ = synthesize(gen, learner, cfg, GeneratorConfig(max_length=10), dpc=3, seed=0, progress=False,
                              label_filter=reference, pools=lambda i: pool, on_set=made.append)
    kept = {int(t[0].split()[1]) for t in subset.texts}
    assert subset.counts(2) == [3, 3] and all(follows[i] for i in kept)
    assert made[0].pool is pool and made[0].consistent == 7
    (unfiltered,), _ = synthesize(gen, learner, cfg, GeneratorConfig(max_length=10), dpc=3, seed=0, progress=False, pools=lambda i: pool)
    assert unfiltered.counts(2) == [3, 3]


def test_coreset_methods_pick_per_class():
    emb = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    for method in ("random", "k_centers", "herding"):
        idx = select_per_class(emb, labels, 2, method, seed=0)
        assert sorted(labels[idx].tolist()) == [0, 0, 1, 1]
    assert set(select_per_class(emb, labels, 1, "herding", 0).tolist()) == {1, 4}


def test_training_on_real_data_beats_chance_and_is_reproducible(tiny_bert_dir, toy_sets):
    train, val = toy_sets
    learner = build_learner(LearnerConfig(model=str(tiny_bert_dir), max_length=16), 2, seed=0)
    cfg = EvaluateConfig(steps=60, lr=3e-3, batch_size=32)
    train_learner(learner, train, cfg, seed=1)
    first = predict(learner, val, 64)
    assert scores(first, val.labels, "accuracy")["accuracy"] > 0.8
    train_learner(learner, train, cfg, seed=1)
    assert np.array_equal(first, predict(learner, val, 64))


def test_accuracy_f1_metric():
    s = scores(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 1]), "accuracy_f1")
    assert s["accuracy"] == 0.5 and s["f1"] == 0.5 and s["score"] == 0.5


def test_stats():
    assert summarize([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2**0.5), "runs": 2}
    assert welch_p([0.9, 0.91, 0.92], [0.5, 0.51, 0.52]) < 0.001
    assert np.isnan(welch_p([1.0], [0.5, 0.6]))
    low, high = welch_ci([0.9, 0.91, 0.92], [0.5, 0.51, 0.52])
    assert low < 0.4 < high and high - low < 0.05  # around the difference of means, narrow for tight samples
    low, high = welch_ci([0.6, 0.7, 0.8, 0.65], [0.62, 0.72, 0.69])
    assert low < 0 < high  # overlapping samples: the interval holds 0


def test_results_table_has_one_p_column_per_reference():
    import pandas as pd

    scores = {"dilm": [0.70, 0.72, 0.74], "k_centers": [0.60, 0.63, 0.61], "random": [0.58, 0.66, 0.62]}
    runs = pd.DataFrame([{"learner": "m", "dpc": 10, "method": m, "score": v, "seconds": 1.0} for m, vs in scores.items() for v in vs])
    table = results_table(runs, references=("k_centers", "random")).set_index("method")
    assert table.loc["dilm", "p_vs_k_centers"] == pytest.approx(welch_p(scores["dilm"], scores["k_centers"]))
    assert table.loc["dilm", "p_vs_random"] == pytest.approx(welch_p(scores["dilm"], scores["random"]))
    assert np.isnan(table.loc["k_centers", "p_vs_k_centers"]) and np.isnan(table.loc["random", "p_vs_random"])
    md = to_markdown(table.reset_index(), "accuracy").splitlines()
    assert md[0].endswith("| p vs k_centers | p vs random |")
    assert md[2] == f"| m | 10 | dilm | 72.0 ± 2.0 | 3 | {table.loc['dilm', 'p_vs_k_centers']:.3g} | {table.loc['dilm', 'p_vs_random']:.3g} |"


def test_table_header_names_the_task_score():
    """QQP's score is the mean of accuracy and F1 (GLUE); its tables must not call it accuracy."""
    import pandas as pd

    runs = pd.DataFrame([{"learner": "m", "dpc": 5, "method": "dilm", "score": 0.5, "seconds": 1.0}])
    table = results_table(runs, references=())
    assert to_markdown(table, BUILTIN_TASKS["qqp"].score_name).startswith("| learner | DPC | method | mean of accuracy and F1 (mean ± std, %) |")
    assert to_markdown(table, BUILTIN_TASKS["sst2"].score_name).startswith("| learner | DPC | method | accuracy (mean ± std, %) |")


def test_run_plan_gives_every_group_the_same_runs():
    groups = {("dilm", 5): ["a", "b"], ("herding", 5): ["h"]}
    plan = plan_jobs(groups, 4, seed=10, learners=["x", "y"])
    herding = [(r.set_index, r.seed) for r in plan if r.method == "herding" and r.learner == "x"]
    assert herding == [(0, 10), (0, 11), (0, 12), (0, 13)]
    assert [r.set_index for r in plan if r.method == "dilm" and r.learner == "y"] == [0, 1, 0, 1]
    assert len(plan) == 2 * 2 * 4
    assert [r.method for r in plan[:4]] == ["dilm", "herding", "dilm", "herding"]  # groups take turns


def test_evaluate_groups_table(tiny_bert_dir, toy_sets, tiny_overrides, tmp_path):
    train, val = toy_sets
    cfg = load_config("configs/sst2-cpu.yaml", tiny_overrides + ["evaluate.steps=2"])
    groups = loaded_sets({("dilm", 2): [train.select([0, 1, 2, 3])], ("random", 2): [train.select([4, 5, 6, 7])]})
    runs = evaluate_groups(cfg, TaskData(SST2, train, val), groups, tmp_path / "runs.csv", learners=[str(tiny_bert_dir), "tfidf-logreg"], parallel=False)
    assert len(runs) == 2 * 2 * 2 and set(runs.method) == {"dilm", "random"}
    assert set(runs.family) == {"encoder", "tfidf-logreg"}
    table = results_table(runs)
    assert len(table) == 4 and (table.runs == 2).all()
    assert "p_vs_dilm" in table.columns


def test_train_embeddings_are_cached_per_learner_and_data(tiny_overrides, toy_sets, tmp_path):
    from dilm_ray.train.embeddings import train_embeddings

    train, _ = toy_sets
    cfg = load_config("configs/sst2-cpu.yaml", tiny_overrides)
    calls = []

    def counted(learner):
        embed = learner.embed
        learner.embed = lambda *a, **k: calls.append(1) or embed(*a, **k)
        return learner

    learner = counted(build_learner(cfg.learner, 2, seed=0))
    first = train_embeddings(tmp_path, train, learner)
    again = train_embeddings(tmp_path, train, counted(build_learner(cfg.learner, 2, seed=5)))  # the seed only draws the head
    assert len(calls) == 1 and torch.equal(first, again) and first.shape[0] == len(train)
    train_embeddings(tmp_path, train, counted(build_learner(cfg.learner.model_copy(update={"max_length": 8}), 2, seed=0)))
    assert len(calls) == 2  # another truncation: another cache entry
    train_embeddings(tmp_path, train.select(range(len(train) - 1)), learner)
    assert len(calls) == 3  # other rows
    half = counted(build_learner(cfg.learner, 2, seed=0))
    half.model.to(torch.bfloat16)
    half._initial_body = {k: v.to(torch.bfloat16) for k, v in half._initial_body.items()}
    train_embeddings(tmp_path, train, half)
    assert len(calls) == 4  # another precision
    pooled = counted(build_learner(cfg.learner.model_copy(update={"pooling": "cls"}), 2, seed=0))
    train_embeddings(tmp_path, train, pooled)
    assert len(calls) == 5  # another pooling
