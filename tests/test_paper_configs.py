"""The paper configs (``configs/{sst2,mnli,qqp}.yaml``) end to end through ``dilm-ray run``, on
stand-ins with the paper's architectures.

The stand-ins are built here (``conftest.build_paper_gpt2`` / ``build_paper_bert``): a GPT-2
(``model_type`` gpt2, byte-level BPE trained on the toy words, no pad token, as the hub's
``gpt2``) and a BERT (``model_type`` bert, WordPiece, segment ids for pairs), in the hub's folder
layout. Each config runs as shipped except for the overrides in ``SIZED`` (``ALLOWED`` is the
list the test holds them to): model paths, step counts, pool / repset / matching sizes scaled
down, ``ray.use_gpu=false`` and ``ray.num_workers=2``. Full fine-tuning, pooling, ``grad``,
``lm_lambda``, intervals, schedulers, ``synthesize.dpc`` and the evaluation protocol stay the
config's. All three are marked slow (``make test-slow``): MNLI took 60 s of ``make test``'s 18 min on
an AMD EPYC with AVX512-BF16.
Wall time on 2 shared AVX2 cores: MNLI 3.8 min (load ~5) to 5.8 min (load ~12-16), most of it
two Ray Train start-ups; SST-2 3.2 min, QQP 5.0 min. The stand-ins are built once and kept in
pytest's cache (~20 s the first time).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import GPT2_EOS, toy_glue

REPO = Path(__file__).parents[1]

# Scaled-down sizes; every key is one ALLOWED lets differ from the shipped config.
SIZED = [
    "pretrain.steps=2",  # warmup int(2 x 0.05) = 0: both steps move every weight
    "distill.steps=10",  # one outer loop of inner_loop 10; one pool (generate_interval 20 > 1 loop)
    "distill.learner_steps=2",
    "distill.n_repset=1", "distill.repset_dpc=4", "distill.gm_real_dpc=4",
    "distill.gm_syn_dpc=2",  # 2, not 1: softmax weights over one sample are constant, no gradient reaches the generator
    "synthesize.over_sample_ratio=2", "synthesize.n_datasets=1",
    "evaluate.steps=2", "evaluate.n_evals_per_dataset=1",
    "ray.use_gpu=false", "ray.num_workers=2",
]
ALLOWED = {
    "data.path",  # the configs load GLUE from the hub; the toy copy in the task's layout instead
    "generator.model", "learner.model",
    "pretrain.steps", "distill.steps", "distill.learner_steps", "evaluate.steps",
    "data.max_train_samples", "data.max_validation_samples",
    "distill.n_repset", "distill.repset_dpc", "distill.gm_real_dpc", "distill.gm_syn_dpc",
    "synthesize.over_sample_ratio", "synthesize.n_datasets", "evaluate.n_evals_per_dataset",
    "ray.use_gpu", "ray.num_workers",
    "precision",  # not set: `auto` resolves from ray.use_gpu (bf16 on CUDA workers, here the CPU's own)
}
METHODS = {"dilm", "lm_only", "random", "k_centers", "herding"}


def _overrides(task: str, root: Path, gpt2: Path, bert: Path) -> list[str]:
    return [f"data.path={toy_glue(root / 'glue', task)}", f"generator.model={gpt2}", f"learner.model={bert}", *SIZED]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.integration
@pytest.mark.parametrize("task", [pytest.param("mnli", marks=pytest.mark.slow), pytest.param("sst2", marks=pytest.mark.slow), pytest.param("qqp", marks=pytest.mark.slow)])
def test_paper_config_runs_end_to_end_on_stand_ins(task, paper_gpt2_dir, paper_bert_dir, tmp_path):
    from dilm_ray.config import flatten, load_config
    from dilm_ray.data import load_file as load_set
    from dilm_ray.data.tasks import BUILTIN_TASKS as TASKS

    config = REPO / "configs" / f"{task}.yaml"
    overrides = _overrides(task, tmp_path, paper_gpt2_dir, paper_bert_dir)
    shipped, sized = (flatten(load_config(config, o).to_dict()) for o in ([], overrides))
    assert {k for k in shipped if shipped[k] != sized[k]} <= ALLOWED
    assert shipped["generator.train_top_layers"] is None and shipped["generator.lora_rank"] is None  # full fine-tuning

    env = {
        **os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp"), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        # one torch thread in the driver (synthesis, coresets), as Ray gives its 1-CPU workers: at
        # width 32 a second thread only waits for a core, 3x slower on 2 shared cores
        "OMP_NUM_THREADS": "1",
    }
    ran = subprocess.run([sys.executable, "-m", "dilm_ray.cli", "run", str(config), *overrides],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)  # output_dir: runs/ under cwd
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr
    run = tmp_path / "runs" / shipped["name"]

    # stages 1-2 fine-tuned every weight of the GPT-2 (full fine-tuning), on 2 workers
    lm, dilm = run / "generator-lm", run / "generator-dilm"
    assert json.loads((lm / "config.json").read_text())["model_type"] == "gpt2"
    tokenizer = json.loads((lm / "tokenizer_config.json").read_text())
    assert tokenizer.get("pad_token") is None and tokenizer["eos_token"] == GPT2_EOS  # still the hub's layout: no pad token
    labels = TASKS[task].num_labels
    stand_in, stage1, stage2 = _weights(paper_gpt2_dir), _weights(lm), _weights(dilm)
    grown = {k for k in stage1 if stage1[k].shape != stand_in[k].shape}
    assert grown == {"transformer.wte.weight"} and len(stage1[next(iter(grown))]) == len(stand_in[next(iter(grown))]) + labels + 1  # <bos_i>, <sep>
    for name, weight in stage1.items():
        assert not torch.equal(weight[: len(stand_in[name])], stand_in[name]), f"stage 1 left {name} unchanged"
        assert not torch.equal(stage2[name], weight), f"stage 2 left {name} unchanged"
    assert {p.name for p in (run / "logs").iterdir()} >= {f"{s}-rank{r}.log" for s in ("pretrain", "distill") for r in (0, 1)}

    # every generated set is well formed and DPC rows per label, for every DPC of the config
    for method in ("dilm", "lm_only"):
        for dpc in shipped["synthesize.dpc"]:
            made = load_set(run / "distilled" / method / f"dpc{dpc}" / "set0" / "train.jsonl", TASKS[task])
            assert list(made.counts(labels)) == [dpc] * labels
            assert all(len(texts) == len(TASKS[task].text_columns) and all(t.strip() for t in texts) for texts in made.texts)

    # the evaluation protocol: one BERT run per (method, DPC, set, seed), the table over all of them
    runs = pd.read_csv(run / "results" / "runs.csv")
    assert len(runs) == len(METHODS) * len(shipped["synthesize.dpc"]) and set(runs.method) == METHODS
    table = pd.read_csv(run / "results" / "table.csv")
    assert set(zip(table.method, table.dpc)) == {(m, d) for m in METHODS for d in shipped["synthesize.dpc"]}
    assert "| learner | DPC | method |" in ran.stdout

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    parent = mlflow.search_runs(experiment_names=[f"dilm-{task}"], filter_string="tags.command = 'run'")
    assert list(parent.status) == ["FINISHED"]
    assert parent["params.generator.train_top_layers"][0] == "None" and parent["params.distill.grad"][0] == "head"


# ---- the stand-ins' hub traits, as the package meets them (no Ray, seconds) --------------------


def test_a_gpt2_without_pad_token_pads_with_eos_and_scores_rows_as_if_alone(paper_gpt2_dir):
    from dilm_ray.config import GeneratorConfig
    from dilm_ray.data.dataset import TextSet
    from dilm_ray.data.tasks import BUILTIN_TASKS as TASKS
    from dilm_ray.models.generator import build_generator

    gen = build_generator(GeneratorConfig(model=str(paper_gpt2_dir), max_length=128), TASKS["mnli"])
    eos = gen.tokenizer.convert_tokens_to_ids(GPT2_EOS)
    assert gen.tokenizer.pad_token is None and gen.pad_id == gen.eos_id == eos
    assert gen.prompt(2) == [eos, gen.bos_ids[2]]  # GPT-2's BOS is its EOS: the sink token
    assert eos not in gen.banned_ids and gen.sep_id not in gen.banned_ids
    pairs = TextSet(("premise", "hypothesis"), (("bad sad good", "the movie was fun and great"), ("dull", "ugly")), torch.tensor([0, 2]).numpy())
    batch = gen.batch(pairs)
    assert (batch["input_ids"][1][batch["attention_mask"][1] == 0] == eos).all()  # padded with EOS, masked
    gen.model.eval()
    with torch.no_grad():
        together = gen.lm_losses(pairs)
        alone = torch.cat([gen.lm_losses(pairs.select([i])) for i in range(2)])
    torch.testing.assert_close(together, alone)
    encoded = gen.encode(pairs.texts[0], 0)
    assert encoded[-1] == eos and gen.parse(encoded[2:-1]) == pairs.texts[0]  # byte-level BPE decodes back to the words


def test_a_bert_learner_reads_pairs_with_segment_ids(paper_bert_dir):
    from dilm_ray.config import LearnerConfig
    from dilm_ray.data.dataset import TextSet
    from dilm_ray.models.learner import build_learner

    learner = build_learner(LearnerConfig(model=str(paper_bert_dir), pooling="cls"), 3, seed=0)
    assert learner.pair_encoding == "segments"
    pairs = TextSet(("premise", "hypothesis"), (("bad sad good", "dull ugly bright"),), torch.tensor([0]).numpy())
    batch = learner.batch(pairs)
    tokens = learner.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens == ["[CLS]", "bad", "sad", "good", "[SEP]", "dull", "ugly", "bright", "[SEP]"]
    assert batch["token_type_ids"][0].tolist() == [0] * 5 + [1] * 4
    learner.model.eval()
    with torch.no_grad():  # the segment ids reach the body: without them the features differ
        with_segments = learner.model.features(**batch)
        without = learner.model.features(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(with_segments, without)


def test_gpu_workers_this_machine_lacks_end_stage_1_in_one_line(paper_gpt2_dir, paper_bert_dir, tmp_path, monkeypatch):
    """As shipped (4 GPU workers), a paper config on a machine without them waited at stage 1's
    0% with no word: Ray queued workers no node of the embedded Ray could take."""
    from click.testing import CliRunner

    from dilm_ray.cli import main
    from dilm_ray.config import load_config
    from dilm_ray.errors import UserError
    from dilm_ray.pipeline.base import check_gpu_workers

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    shipped = load_config(REPO / "configs" / "mnli.yaml")
    with pytest.raises(UserError, match=r"^stage pretrain: ray.use_gpu=true with ray.num_workers=4 needs 4 GPUs, and this machine has 1 that torch can use"):
        check_gpu_workers(shipped, "pretrain", visible_gpus=1)
    check_gpu_workers(shipped, "pretrain", visible_gpus=4)
    check_gpu_workers(load_config(REPO / "configs" / "mnli.yaml", ["ray.use_gpu=false"]), "pretrain", visible_gpus=0)
    check_gpu_workers(load_config(REPO / "configs" / "mnli.yaml", ["ray.address=10.0.0.1:6379"]), "pretrain", visible_gpus=0)  # a cluster may scale up

    if torch.cuda.device_count() >= 4:
        pytest.skip("this machine has the config's 4 GPUs")
    args = ["pretrain", str(REPO / "configs" / "mnli.yaml"), f"data.path={toy_glue(tmp_path / 'glue', 'mnli')}", f"generator.model={paper_gpt2_dir}",
            f"learner.model={paper_bert_dir}", f"output_dir={tmp_path / 'runs'}", "tracking.enabled=false"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert result.output.strip().splitlines()[-1].startswith("error: stage pretrain: ray.use_gpu=true with ray.num_workers=4 needs 4 GPUs")


def test_gpt2_packs_its_samples_also_with_frozen_layers_held_in_bf16(paper_gpt2_dir):
    """GPT-2 (learned positions, LayerNorm in the weights' dtype) keeps packed samples apart, and
    the check runs while every weight is fp32: with the frozen layers held in bf16 and the top
    block fp32, a later fp32 check would feed bf16 activations to fp32 weights."""
    from dilm_ray.config import GeneratorConfig
    from dilm_ray.data.dataset import TextSet
    from dilm_ray.data.tasks import BUILTIN_TASKS as TASKS
    from dilm_ray.models.generator import build_generator, set_trainable
    from dilm_ray.precision import autocast, prepare

    gen = build_generator(GeneratorConfig(model=str(paper_gpt2_dir), max_length=64, train_top_layers=1), TASKS["mnli"])
    set_trainable(gen, GeneratorConfig(model=str(paper_gpt2_dir), train_top_layers=1), label_tokens=True)
    prepare(gen.model, "bf16")
    assert gen.packs_samples  # checked by build_generator; checked now, it would raise and pad
    pairs = TextSet(("premise", "hypothesis"), (("bad sad good", "the movie was fun"), ("dull", "ugly"), ("a", "b c")), torch.tensor([0, 2, 1]).numpy())
    assert gen.packed_batch(pairs)["input_ids"].shape[0] == 1  # all three in one row
    gen.model.eval()
    with torch.no_grad(), autocast("bf16"):
        packed = gen.lm_losses(pairs)
        gen.packing = False
        padded = gen.lm_losses(pairs)
    torch.testing.assert_close(packed, padded, atol=0.05, rtol=0.02)  # bf16 rounding
