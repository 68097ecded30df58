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
    from dilm_ray.commands.pipeline import LoadedSet

    return {g: [LoadedSet(s, s.digest(), Path("-")) for s in sets] for g, sets in groups.items()}


def benchmark_script(name: str):
    """A script of ``benchmarks/`` (not a package) loaded as a module, for its click command."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
