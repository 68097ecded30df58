"""Tiny models built with ``from_config`` and toy data the tests write themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One auth mode for every local Ray the tests start in this process (token auth is cached per process).
os.environ["RAY_AUTH_MODE"] = "disabled"

NEG = "bad awful boring dull terrible sad poor weak ugly slow".split()
POS = "good great fun bright superb happy rich strong pretty fast".split()
FILLER = "the movie film story plot was is a very quite and but".split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def toy_sentences(n: int, seed: int, pair: bool = False) -> pd.DataFrame:
    """Label 1 sentences use positive words, label 0 negative ones: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)

    def sentence(words: list[str]) -> str:
        picks = [FILLER[int(i)] for i in torch.randint(len(FILLER), (3,), generator=g)]
        picks.insert(int(torch.randint(4, (1,), generator=g)), words[int(torch.randint(len(words), (1,), generator=g))])
        return " ".join(picks)

    rows = []
    for i in range(n):
        label = i % 2
        words = POS if label else NEG
        if pair:
            rows.append({"premise": sentence(words), "hypothesis": sentence(words), "label": label, "idx": i})
        else:
            rows.append({"sentence": sentence(words), "label": label, "idx": i})
    return pd.DataFrame(rows)


def toy_glue(out: Path, task: str) -> Path:
    """``out`` in the GLUE parquet layout of the built-in ``task`` (its columns, labels and
    validation split), in the tiny tokenizer's words: 3 words per text, 30 train rows per label."""
    columns = {"sst2": ("sentence",), "mnli": ("premise", "hypothesis"), "qqp": ("question1", "question2")}[task]
    labels = 3 if task == "mnli" else 2
    validation = "validation_matched" if task == "mnli" else "validation"
    words = NEG + POS + FILLER
    out.mkdir(parents=True)
    for split, n in (("train", 30 * labels), (validation, 12 * labels)):
        rows = [{**{c: " ".join(words[(i * 7 + j * 3 + k * 5) % len(words)] for k in range(3)) for j, c in enumerate(columns)},
                 "label": i % labels, "idx": i} for i in range(n)]
        pd.DataFrame(rows).to_parquet(out / f"{split}.parquet")
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + NEG + POS + FILLER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def _save(model, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    n = len(SPECIALS + NEG + POS + FILLER)
    cfg = LlamaConfig(
        vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        tie_word_embeddings=True,
    )
    return _save(LlamaForCausalLM(cfg), tokenizer_dir, tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    n = len(SPECIALS + NEG + POS + FILLER)
    cfg = BertConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, pad_token_id=0)
    return _save(BertModel(cfg), tokenizer_dir, tmp_path_factory.mktemp("tiny-bert"))


def toy_corpus() -> list[str]:
    """The texts the paper stand-ins' tokenizers and GPT-2 are trained on: toy sentences in the
    words ``toy_sentences`` and ``toy_glue`` draw from (400 texts of 4 words, then all words once)."""
    pairs = toy_sentences(200, seed=5, pair=True)
    return [*pairs.premise, *pairs.hypothesis, " ".join(NEG + POS + FILLER)]


GPT2_EOS = "<|endoftext|>"


def build_paper_gpt2(out: Path, n_positions: int = 128, lm_steps: int = 100) -> Path:
    """A tiny GPT-2 in the hub's layout at ``out``: ``GPT2LMHeadModel`` (``model_type`` gpt2, 2 blocks
    of width 32, tied embeddings, ``n_positions`` positions) and a ``GPT2TokenizerFast`` whose
    byte-level BPE is trained here on ``toy_corpus``. As the hub's ``gpt2``: ``<|endoftext|>`` is
    BOS, EOS and UNK and the last id, there is NO pad token, and the LM is pre-trained on documents
    separated by ``<|endoftext|>`` (``lm_steps`` AdamW steps on ``toy_corpus``, 5-25 s on 2 busy
    cores), so that it writes short texts in the toy words and ends them, as a pre-trained LM
    does: from random weights every sample would run to ``generator.max_length`` in byte soup.
    Deterministic for given arguments. Returns ``out``."""
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(toy_corpus(), vocab_size=400, min_frequency=1, show_progress=False)
    trained = json.loads(bpe._tokenizer.to_str())["model"]  # the public API gives the vocabulary, not the merges
    vocab = {**trained["vocab"], GPT2_EOS: len(trained["vocab"])}  # the hub's gpt2 has it last (50256)
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=[tuple(m) for m in trained["merges"]])
    assert tokenizer.pad_token is None and tokenizer.eos_token == tokenizer.bos_token == GPT2_EOS
    eos = tokenizer.convert_tokens_to_ids(GPT2_EOS)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2, bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(cfg)
    docs = [[eos, *tokenizer(t)["input_ids"], eos] for t in toy_corpus()]
    ids = torch.full((len(docs), max(map(len, docs))), eos)
    mask = torch.zeros_like(ids)
    for i, doc in enumerate(docs):
        ids[i, : len(doc)], mask[i, : len(doc)] = torch.tensor(doc), 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # width-32 matrices gain nothing from a second thread, and lose ~3x waiting for it on busy cores
    try:
        for _ in range(lm_steps):
            rows = torch.randint(len(docs), (32,), generator=rng)
            model(input_ids=ids[rows], attention_mask=mask[rows], labels=ids[rows].masked_fill(mask[rows] == 0, -100)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_paper_bert(out: Path, max_positions: int = 128) -> Path:
    """A tiny uncased BERT in the hub's layout at ``out``: ``BertModel`` (``model_type`` bert, 2 blocks of
    width 32, 2 segment types, ``max_positions`` positions) and a ``BertTokenizerFast`` whose WordPiece
    vocabulary is trained here on ``toy_corpus`` (``[PAD]`` 0, pairs as ``[CLS] a [SEP] b [SEP]`` with
    segment ids 0 / 1, as ``bert-base-uncased``). Random weights drawn with std 0.2, not BERT's 0.02:
    at 0.02 the ``[CLS]`` output hardly depends on the text (std across toy rows 0.002 against 0.3),
    so real and generated rows give the same head gradients (grad_sim 1.000) and the matching, the
    K-means teachers and the K-centers sets work on near-identical points. Returns ``out``."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(toy_corpus(), vocab_size=200, min_frequency=1, show_progress=False)
    tokenizer = BertTokenizerFast(vocab=wordpiece.get_vocab(), do_lower_case=True)
    assert tokenizer.pad_token_id == 0 and "token_type_ids" in tokenizer.model_input_names
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=max_positions, type_vocab_size=2, pad_token_id=0, initializer_range=0.2)
    BertModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _cached_model(request, tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` made once and kept in pytest's cache (``.pytest_cache/d/paper-models``)
    under a key of the builder's source, the toy words and the library versions, so later sessions load it;
    without the cache plugin (``-p no:cacheprovider``), once per session in a temp folder."""
    import hashlib
    import inspect
    import shutil

    import tokenizers
    import transformers

    cache = getattr(request.config, "cache", None)
    if cache is None:
        return build(tmp_path_factory.mktemp(name))
    source = "".join(inspect.getsource(f) for f in (build, toy_sentences, toy_corpus)) + repr((NEG, POS, FILLER, GPT2_EOS))
    key = hashlib.sha1(f"{source}{transformers.__version__}{tokenizers.__version__}{torch.__version__}".encode()).hexdigest()[:12]
    folder = cache.mkdir("paper-models") / f"{name}-{key}"
    if not (folder / "config.json").is_file():
        built, staged = build(tmp_path_factory.mktemp(name)), folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        shutil.copytree(built, staged)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            staged.rename(folder)  # complete or absent, never half-written
        except OSError:  # another session put it there first: theirs is the same
            shutil.rmtree(staged, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def paper_gpt2_dir(request, tmp_path_factory) -> Path:
    """The stand-in for the paper configs' ``gpt2`` (``build_paper_gpt2``), built once and cached."""
    return _cached_model(request, tmp_path_factory, "paper-gpt2", build_paper_gpt2)


@pytest.fixture(scope="session")
def paper_bert_dir(request, tmp_path_factory) -> Path:
    """The stand-in for the paper configs' ``bert-base-uncased`` (``build_paper_bert``), built once and cached."""
    return _cached_model(request, tmp_path_factory, "paper-bert", build_paper_bert)


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy-sst2")
    toy_sentences(200, seed=1).to_parquet(out / "train.parquet")
    toy_sentences(60, seed=2).to_parquet(out / "validation.parquet")
    return out


@pytest.fixture
def toy_sets(toy_data_dir):
    """The toy SST-2 (train, validation) as TextSets."""
    from dilm_ray.config import DataConfig
    from dilm_ray.data import load_split, resolve_task

    cfg = DataConfig(path=str(toy_data_dir))
    task = resolve_task(cfg)
    return load_split(cfg, task, "train"), load_split(cfg, task, "validation")


@pytest.fixture(scope="session")
def toy_pair_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy-mnli")
    toy_sentences(120, seed=3, pair=True).to_parquet(out / "train.parquet")
    toy_sentences(40, seed=4, pair=True).to_parquet(out / "validation_matched.parquet")
    return out


@pytest.fixture
def tiny_overrides(tiny_lm_dir, tiny_bert_dir, toy_data_dir, tmp_path) -> list[str]:
    """Overrides that make any config run in seconds on the tiny models and toy data."""
    return [
        f"data.path={toy_data_dir}",
        f"generator.model={tiny_lm_dir}",
        f"learner.model={tiny_bert_dir}",
        f"output_dir={tmp_path / 'runs'}",
        "name=t",
        "tracking.enabled=false",
        "generator.max_length=12",
        "generator.train_top_layers=null",
        "learner.max_length=16",
        "pretrain.steps=3",
        "pretrain.batch_size=8",
        "distill.steps=4",
        "distill.inner_loop=2",
        "distill.learner_steps=1",
        "distill.learner_batch_size=8",
        "distill.n_repset=1",
        "distill.repset_dpc=4",
        "distill.gm_real_dpc=4",
        "distill.gm_real_accum=1",
        "distill.gm_syn_dpc=2",
        "distill.generate_interval=1",
        "distill.lr=1e-3",
        "synthesize.dpc=[2]",
        "synthesize.n_datasets=2",
        "synthesize.over_sample_ratio=2",
        "evaluate.steps=3",
        "evaluate.n_evals_per_dataset=1",
        "threads=1",
    ]


def _shutdown_ray() -> None:
    import sys

    if "ray" in sys.modules:  # only if something imported it: importing Ray costs seconds
        import ray

        ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_running():
    """The one Ray fixture: whatever a test module started (a local cluster below, or the
    embedded Ray a command starts) is shut down when the module ends, pass or fail."""
    _shutdown_ray()
    try:
        yield
    finally:
        _shutdown_ray()


@pytest.fixture(scope="module")
def ray_2_cpus(no_ray_left_running):
    """A local Ray with 2 CPUs in its own temp dir (Ray's socket paths must stay under 107
    bytes), with the dashboard (Train needs the State API) and fast Train health checks."""
    import tempfile

    import ray

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    ray.init(num_cpus=2, _temp_dir=tempfile.mkdtemp(prefix="r", dir="/tmp"), include_dashboard=True, logging_level="ERROR",
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "HF_HUB_OFFLINE": "1"}})
    try:
        yield
    finally:
        ray.shutdown()


def loaded_sets(groups: dict) -> dict:
    """``{(method, dpc): [TextSet]}`` as the evaluation reads sets: with a digest each."""
    from dilm_ray.pipeline.evaluate import LoadedSet

    return {g: [LoadedSet(s, s.digest(), Path("-")) for s in sets] for g, sets in groups.items()}


def benchmark_script(name: str):
    """A script of ``benchmarks/`` (not a package) loaded as a module, for its click command."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
