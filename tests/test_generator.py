import dataclasses

import numpy as np
import pytest
import torch

from dilm_ray.config import GeneratorConfig
from dilm_ray.data import BUILTIN_TASKS, TextSet
from dilm_ray.models.generator import build_generator, sample_tokens, top_k_top_p_probs

SST2, MNLI = BUILTIN_TASKS["sst2"], BUILTIN_TASKS["mnli"]


@pytest.fixture
def gen(tiny_lm_dir):
    return build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=12, top_k=10), SST2)


def test_label_tokens_start_from_label_names(tiny_lm_dir):
    task = dataclasses.replace(SST2, label_names=("awful", "superb"))  # names in the tiny vocabulary
    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=12), task)
    emb, tok = gen.model.get_input_embeddings().weight, gen.tokenizer
    assert len(set(gen.bos_ids)) == 2 and gen.sep_id not in gen.bos_ids
    for bos_id, name in zip(gen.bos_ids, task.label_names):
        assert torch.equal(emb[bos_id], emb[tok.convert_tokens_to_ids(name)])
    assert not torch.equal(emb[gen.bos_ids[0]], emb[gen.bos_ids[1]])
    assert torch.equal(emb[gen.sep_id], emb[tok.bos_token_id])
    ids = gen.encode(("good movie",), 1)
    assert ids[:2] == [tok.bos_token_id, gen.bos_ids[1]] and ids[-1] == gen.eos_id  # BOS first: the sink


def test_without_the_sink_token_the_label_token_comes_first(tiny_lm_dir):
    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=12, sink_token=False), SST2)
    assert gen.encode(("good movie",), 1)[0] == gen.bos_ids[1]


def test_lm_loss_scores_the_text_not_the_label_token(gen):
    one = TextSet(("sentence",), (("good movie",),), np.array([1]))
    with torch.no_grad():
        batch = gen.batch(one)
        nll = torch.nn.functional.cross_entropy(gen.model(**batch).logits[0, :-1], batch["input_ids"][0, 1:], reduction="none")
        assert torch.isclose(gen.lm_losses(one)[0], nll[1:].mean())  # target 0 is <bos_1> after the sink


def test_label_tokens_can_start_as_copies_of_bos(tiny_lm_dir):
    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=12, label_init="bos"), SST2)
    emb = gen.model.get_input_embeddings().weight
    for i in gen.bos_ids + [gen.sep_id]:
        assert torch.equal(emb[i], emb[gen.tokenizer.bos_token_id])


def test_a_saved_generator_keeps_its_trained_label_tokens(gen, tmp_path):
    emb = gen.model.get_input_embeddings().weight
    with torch.no_grad():
        emb[gen.bos_ids[0]] += 1.0  # as if stage 1 had trained it
    trained = emb[gen.bos_ids[0]].clone()
    gen.save(tmp_path)
    again = build_generator(GeneratorConfig(max_length=12), SST2, str(tmp_path))
    assert again.bos_ids == gen.bos_ids
    assert torch.equal(again.model.get_input_embeddings().weight[again.bos_ids[0]], trained)


def test_lm_loss_ignores_padding(gen):
    one = TextSet(("sentence",), (("good movie",),), np.array([1]))
    two = TextSet(("sentence",), (("good movie",), ("the film was very quite dull and slow",)), np.array([1, 0]))
    with torch.no_grad():
        alone, padded = gen.lm_losses(one)[0], gen.lm_losses(two)[0]
    assert torch.isclose(alone, padded, atol=1e-5)


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs, ids = top_k_top_p_probs(logits, top_k=4, top_p=0.7)
    kept = ids[probs > 0].tolist()
    assert kept == [0, 1]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    probs, _ = top_k_top_p_probs(logits, top_k=4, top_p=1e-6)
    assert (probs > 0).sum() == 1


def test_sampling_is_seeded(gen):
    cfg = GeneratorConfig(max_length=12, top_k=10)
    a = gen.sample(0, 4, cfg, torch.Generator().manual_seed(3))
    b = gen.sample(0, 4, cfg, torch.Generator().manual_seed(3))
    assert a == b and all(len(s) <= 11 for s in a)


def test_rows_that_stop_early_leave_the_batch_without_disturbing_the_others():
    """Greedy decoding (top_k=1) must equal each row's own uncached greedy path, cut at EOS, when
    rows finish at different steps and are dropped from the batch and the KV cache. Large random
    weights make every next token depend on the whole history, so a misaligned cache shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, initializer_range=1.0, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.arange(8)[:, None]
    steps = 10

    def greedy(row: torch.Tensor) -> list[int]:
        ids = row[None]
        with torch.no_grad():
            for _ in range(steps):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
        return ids[0, 1:].tolist()

    paths = [greedy(row) for row in prompt]

    def cut(eos: int) -> list[list[int]]:
        return [p[: p.index(eos)] if eos in p else p for p in paths]

    eos = max(range(config.vocab_size), key=lambda t: len({len(c) for c in cut(t)}))  # the most staggered stops
    expected = cut(eos)
    assert len({len(e) for e in expected}) > 2  # rows really do finish at different steps
    with torch.no_grad():
        got = sample_tokens(model, prompt, steps, top_k=1, top_p=1.0, temperature=1.0, eos_id=eos, rng=torch.Generator().manual_seed(0))
    assert got == expected


def test_pair_generation_round_trips_through_the_separator(tiny_lm_dir):
    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=16), MNLI)
    texts = ("good film", "the movie was bad")
    ids = gen.encode(texts, 2)
    start = len(gen.prompt(2))
    assert gen.parse(ids[start:-1]) == texts  # without prompt and EOS, as sampling returns them
    assert gen.parse(gen.encode(("good film",), 2)[start:-1]) is None  # missing separator
    assert gen.parse([gen.sep_id] + gen.encode(("good",), 0)[start:-1]) is None  # empty side


def _untrained_pair_generator(tiny_lm_dir, max_length: int = 16):
    gen = build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=max_length), MNLI)
    with torch.no_grad():  # an untrained LM that favours <sep> and EOS: free sampling is rarely well-formed
        gen.model.get_output_embeddings().bias = None
        head = gen.model.get_output_embeddings().weight
        head[gen.sep_id] *= 4
        head[gen.eos_id] *= 4
    return gen


def _count_free_malformed(gen, n: int = 64) -> int:
    samples = gen.sample(0, n, GeneratorConfig(max_length=gen.max_length), torch.Generator().manual_seed(0))
    return sum(gen.parse(s) is None for s in samples)


def test_constrained_decoding_writes_well_formed_pairs(tiny_lm_dir):
    gen = _untrained_pair_generator(tiny_lm_dir)
    assert _count_free_malformed(gen) > 16  # the case constrained decoding is for
    cfg = GeneratorConfig(max_length=gen.max_length)
    budget = gen.sample_format.part_budget
    for seed in range(3):
        for ids in gen.sample(1, 64, cfg, torch.Generator().manual_seed(seed), constrained=True):
            assert ids.count(gen.sep_id) == 1 and gen.eos_id not in ids
            first, second = ids[: ids.index(gen.sep_id)], ids[ids.index(gen.sep_id) + 1 :]
            assert 1 <= len(first) <= budget and len(second) >= 1
            assert len(ids) <= gen.max_length - len(gen.prompt(1))
            assert gen.parse(ids) is not None


def test_constrained_logits_per_rule():
    from dilm_ray.models.generator import SampleFormat, constrain_logits

    fmt = SampleFormat(parts=2, sep_id=1, eos_id=2, part_budget=3)
    logits = torch.zeros(5, 4)
    # rows: empty first part; first part of 1 token; first part at its budget; last part empty; last part with text
    part = torch.tensor([0, 0, 0, 1, 1])
    part_len = torch.tensor([0, 1, 3, 0, 2])
    out = constrain_logits(logits, fmt, part, part_len, remaining=10)
    inf = float("-inf")
    assert out[0].tolist() == [0, inf, inf, 0]  # neither <sep> nor EOS before the first token
    assert out[1].tolist() == [0, 0, inf, 0]  # <sep> allowed, EOS not before the last part
    assert out[2].tolist() == [inf, 0, inf, inf]  # <sep> forced at the budget
    assert out[3].tolist() == [0, inf, inf, 0]  # no second <sep>, no EOS before the last part has text
    assert out[4].tolist() == [0, inf, 0, 0]  # the last part may end
    # room for only <sep> and one token: <sep> forced even under the budget
    assert constrain_logits(logits[1:2], fmt, part[1:2], part_len[1:2], remaining=2)[0].tolist() == [inf, 0, inf, inf]
    assert torch.equal(logits, torch.zeros(5, 4))  # the input is left alone
    # with a vocabulary's visible tokens, an empty part opens only with text
    shown = SampleFormat(parts=2, sep_id=1, eos_id=2, part_budget=3, visible=torch.tensor([True, False, False, False]))
    assert constrain_logits(logits[:2], shown, part[:2], part_len[:2], remaining=10).tolist() == [[0, inf, inf, inf], [0, 0, inf, 0]]
    single = SampleFormat(parts=1, sep_id=1, eos_id=2, part_budget=3)
    assert constrain_logits(logits[:2], single, part[:2], part_len[:2], remaining=10).tolist() == [[0, 0, inf, 0], [0, 0, 0, 0]]


def test_rejection_first_then_constrained_fallback(tiny_lm_dir):
    gen = _untrained_pair_generator(tiny_lm_dir)
    free = GeneratorConfig(max_length=16)
    data, dropped, constrained = gen.generate(0, 32, free, torch.Generator().manual_seed(0), max_attempts=1)
    assert len(data) == 32 and dropped > 0 and 0 < constrained < 32  # one free round, the rest under the format
    assert all(a and b for a, b in data.texts)
    # the free round draws exactly what earlier versions drew: its samples lead the set
    kept = [gen.parse(s) for s in gen.sample(0, 32, free, torch.Generator().manual_seed(0))]
    kept = [k for k in kept if k is not None]
    assert list(data.texts[: len(kept)]) == kept and len(kept) == 32 - constrained
    always = GeneratorConfig(max_length=16, constrained_decoding="always")
    data, dropped, constrained = gen.generate(0, 32, always, torch.Generator().manual_seed(0), max_attempts=1)
    assert (dropped, constrained) == (0, 32)


def test_a_generator_that_cannot_write_the_format_ends_in_one_user_error(tiny_lm_dir, monkeypatch):
    from dilm_ray.errors import GenerationError, UserError

    gen = _untrained_pair_generator(tiny_lm_dir, max_length=4)  # sink + label token + 1 before EOS: no room for two parts
    with pytest.raises(GenerationError, match=r"generator.max_length=4 leaves 1 tokens.*raise generator.max_length"):
        gen.generate(0, 4, GeneratorConfig(max_length=4), torch.Generator().manual_seed(0), max_attempts=2)
    gen = _untrained_pair_generator(tiny_lm_dir)
    monkeypatch.setattr(gen, "parse", lambda ids: None)  # every sample malformed, constrained ones too
    with pytest.raises(GenerationError, match=r"only 0/4 well-formed samples of label 0 \(entailment\) in 3 rounds.*pretrain.steps") as err:
        gen.generate(0, 4, GeneratorConfig(max_length=16), torch.Generator().manual_seed(0), max_attempts=2)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


@pytest.fixture
def long_gen(tiny_lm_dir):
    """Rows of 40 tokens: room for several toy samples in one packed row."""
    return build_generator(GeneratorConfig(model=str(tiny_lm_dir), max_length=40, top_k=10), SST2)


def _texts(n, seed=0):
    words = "good bad movie film dull fun great awful the a very quite slow fast story".split()
    rng = np.random.default_rng(seed)
    return TextSet(("sentence",), tuple((" ".join(rng.choice(words, rng.integers(1, 12))),) for _ in range(n)), rng.integers(0, 2, n))


def test_packed_rows_hold_whole_samples_without_padding_between_them(long_gen):
    gen = long_gen
    data = _texts(9)
    packed = gen.packed_batch(data)
    ids, positions, samples = packed["input_ids"], packed["position_ids"], packed["sample_ids"]
    assert ids.shape[1] <= gen.max_length and ids.shape[0] < len(data)  # fewer rows than samples
    for k in range(len(data)):
        row, cols = (samples == k).nonzero(as_tuple=True)
        assert row.unique().numel() == 1 and torch.equal(cols, torch.arange(cols[0], cols[0] + len(cols)))  # one contiguous run
        assert ids[row, cols].tolist() == gen.encode(data.texts[k], int(data.labels[k]))
        assert positions[row, cols].tolist() == list(range(len(cols)))
    tail = samples == -1
    assert (ids[tail] == gen.pad_id).all() and tail.sum() < ids.shape[1]  # pads only at row ends: under a row in all
    assert (tail[:, 1:] | ~tail[:, :-1]).all()  # nothing after a pad but pads


def test_packed_losses_equal_padded_losses_and_their_gradients(long_gen):
    gen = long_gen
    """The packed body sees each sample as alone (per-sample position ids, attention within the
    sample): losses and gradients equal the padded batch's, within fp32 rounding."""
    data = _texts(12, seed=1)
    assert gen.packs_samples
    gen.model.eval()
    losses = {}
    for packing in (True, False):
        gen.packing = packing
        gen.model.zero_grad()
        loss = gen.lm_losses(data)
        loss.mean().backward()
        losses[packing] = (loss.detach(), [p.grad.clone() for p in gen.model.parameters() if p.grad is not None])
    torch.testing.assert_close(losses[True][0], losses[False][0], atol=1e-5, rtol=1e-5)
    for packed, padded in zip(losses[True][1], losses[False][1]):
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)


def test_an_lm_that_reads_across_packed_samples_is_padded_instead(long_gen, monkeypatch):
    gen = long_gen
    """``packs_samples`` is measured, not assumed: an LM whose attention crosses sample
    boundaries (here: position ids ignored) fails the check, and the losses stay the padded ones."""
    forward = gen.model.base_model.forward
    monkeypatch.setattr(gen.model.base_model, "forward", lambda *a, position_ids=None, **k: forward(*a, **k))
    data = _texts(6, seed=2)
    assert gen.packed_batch(data)["input_ids"].shape[0] < len(data)  # some row holds two samples
    del gen.packs_samples  # build_generator checked the LM before it was broken: check again
    assert not gen.packs_samples
    with torch.no_grad():
        packed = gen.lm_losses(data)
        gen.packing = False
        torch.testing.assert_close(packed, gen.lm_losses(data))


def test_label_rows_gradient_is_the_same_every_time_on_two_threads(long_gen):
    """Stage 1 on 2+ threads repeats bit for bit: the label rows' gradient, summed over the many
    positions that share a row, does not depend on the threads' order (indexing's backward
    accumulated with atomic adds, so one step's gradient took ~10 values in 20 runs)."""
    gen, threads = long_gen, torch.get_num_threads()
    rows = gen.train_label_rows()
    gen.packing = False  # ~100 padded rows: enough positions for torch to split the work between threads
    data = _texts(100, seed=2)
    torch.set_num_threads(2)
    try:
        grads = set()
        for _ in range(10):
            rows.grad = None
            gen.lm_losses(data).mean().backward()
            grads.add(rows.grad.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert rows.grad.abs().sum() > 0 and len(grads) == 1
