"""The embedded models load offline from the installed wheels (integration: ~40 s the first time)."""

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from dilm_ray.cli import main
from dilm_ray.config import GeneratorConfig, LearnerConfig
from dilm_ray.data import BUILTIN_TASKS, TextSet
from dilm_ray.errors import UserError
from dilm_ray.models.generator import build_generator
from dilm_ray.models.learner import build_learner
from dilm_ray.models.registry import resolve_model


@pytest.mark.integration
def test_smollm2_converts_once_then_loads_from_the_cache(monkeypatch):
    from dilm_ray.models import registry

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_model("smollm2-135m")  # converts if the cache is cold

    def convert_again(*args, **kwargs):
        raise AssertionError("the GGUF was read again: the converted checkpoint was not reused")

    monkeypatch.setattr(registry, "_package_files", convert_again)  # the conversion's first step
    gen = build_generator(GeneratorConfig(model="smollm2-135m", max_length=24), BUILTIN_TASKS["mnli"])
    assert type(gen.model).__name__ == "LlamaForCausalLM" and gen.model.dtype == torch.float32
    texts = ("A man is walking.", "Someone walks.")
    assert gen.parse(gen.encode(texts, 0)[len(gen.prompt(0)) : -1]) == texts
    samples = gen.sample(0, 2, GeneratorConfig(max_length=24), torch.Generator().manual_seed(0))
    assert len(samples) == 2 and all(len(s) <= 24 - len(gen.prompt(0)) for s in samples)


@pytest.mark.integration
def test_minilm_loads_offline_and_embeds(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    learner = build_learner(LearnerConfig(model="minilm-l6", max_length=32), 2, seed=0)
    texts = (("a great film",), ("a dull film",), ("a great movie",), ("the stock market fell sharply today",))
    emb = learner.embed(TextSet(("sentence",), texts, [1, 0, 1, 0]))
    assert emb.shape == (4, 384)
    cos = torch.nn.functional.cosine_similarity
    # real sentence embeddings: paraphrase > same topic > unrelated (measured 0.93 > 0.56 > 0.07)
    assert cos(emb[0], emb[2], dim=0) > cos(emb[0], emb[1], dim=0) > cos(emb[0], emb[3], dim=0) + 0.2


@pytest.mark.integration
def test_embedded_models_in_a_fresh_offline_process(tmp_path):
    code = "from dilm_ray.models.registry import resolve_model; print(resolve_model('minilm-l6')); print(resolve_model('smollm2-135m'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(__import__("pathlib").Path.home())}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].endswith("smollm2-135m")


def test_unknown_model_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"learner.model: cannot load 'no-such/model'.*HF_HUB_OFFLINE is set.*not an embedded name \(smollm2-135m, minilm-l6\)"):
        build_learner(LearnerConfig(model="no-such/model"), 2, seed=0)


def test_model_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_cli_unknown_model_exits_2(toy_data_dir, tmp_path):
    result = CliRunner().invoke(main, ["pretrain", "configs/sst2-cpu.yaml", f"data.path={toy_data_dir}", "generator.model=no-such/model", "tracking.enabled=false", f"output_dir={tmp_path}"])
    assert result.exit_code == 2 and result.output.startswith("error: generator.model: cannot load 'no-such/model'")
