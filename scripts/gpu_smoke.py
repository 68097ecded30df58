"""GPU smoke test: stage 1, stage 2 and an evaluation run of tiny ``from_config`` models in bf16.

Runs the project's training loops (``pretrain``, ``distill``, ``train_learner`` + ``predict``)
at world size 1 without Ray on one device, with a tiny Llama generator and a tiny BERT learner
built here with ``from_config`` (no hub, no downloads) and toy labelled sentences. Asserts
finite losses, that stage 1 and stage 2 change the parameters they train, that trained
parameters stay fp32 master weights while frozen ones are held in bf16, and prints what it saw.

    python scripts/gpu_smoke.py                 # CUDA (the default device of the runtime)
    python scripts/gpu_smoke.py --device cpu    # the same path on CPU, for a machine without GPU

Needs torch, transformers, numpy, pydantic and this package (``pip install -e . --no-deps``
is enough); not Ray, MLflow or datasets. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WORDS = {0: "bad awful boring dull terrible".split(), 1: "good great fun bright superb".split()}
FILLER = "the movie film story plot was is a very quite".split()


def toy_rows(n: int, seed: int):
    from dilm_ray.data import TextSet

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    texts = tuple((" ".join([*rng.choice(FILLER, 3), rng.choice(WORDS[int(y)])]),) for y in labels)
    return TextSet(("sentence",), texts, labels)


def tiny_models(out: Path) -> tuple[Path, Path]:
    """A 3-layer Llama generator and a 2-layer BERT learner over a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS[0], *WORDS[1], *FILLER])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                                      tie_word_embeddings=True))
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=64, pad_token_id=0))
    for model, name in ((lm, "lm"), (bert, "bert")):
        model.save_pretrained(out / name)
        fast.save_pretrained(out / name)
    return out / "lm", out / "bert"


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAILED'}] {what}")
    if not ok:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    if args.device is None:
        print("no CUDA device here: pass --device cpu to run the same path on CPU")
        sys.exit(1)

    from dilm_ray.config import DistillConfig, EvaluateConfig, GeneratorConfig, LearnerConfig, PretrainConfig
    from dilm_ray.data import BUILTIN_TASKS
    from dilm_ray.evaluation.train_eval import predict, scores, train_learner
    from dilm_ray.models.blocks import transformer_blocks
    from dilm_ray.models.generator import build_generator
    from dilm_ray.models.learner import build_learner
    from dilm_ray.precision import prepare
    from dilm_ray.train.distill import distill
    from dilm_ray.train.pretrain import pretrain
    from dilm_ray.train.runtime import Runtime

    device = torch.device(args.device)
    runtime = Runtime(device=device, precision=args.precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), precision {args.precision}, torch {torch.__version__}")
    task = BUILTIN_TASKS["sst2"]
    train, validation = toy_rows(200, 1), toy_rows(60, 2)
    with tempfile.TemporaryDirectory() as tmp:
        lm_dir, bert_dir = tiny_models(Path(tmp))
        gen_cfg = GeneratorConfig(model=str(lm_dir), max_length=12, train_top_layers=2, generate_batch_size=16)
        gen = build_generator(gen_cfg, task)
        gen.model.to(device)
        top = transformer_blocks(gen.model)[-1].mlp.up_proj.weight
        before = top.detach().clone()

        losses = []
        start = time.perf_counter()
        pretrain(gen, train, PretrainConfig(steps=20, batch_size=16, lr=1e-3, log_every=5), gen_cfg, seed=0, runtime=runtime,
                 logger=type("L", (), {"log": lambda self, m, s: losses.append(m["lm_loss"])})())
        print(f"stage 1: 20 steps in {time.perf_counter() - start:.1f} s, lm_loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        check(all(math.isfinite(v) for v in losses), "stage-1 losses finite")
        check(losses[-1] < losses[0], "stage-1 loss went down")
        check(not torch.equal(top.detach(), before) and top.dtype == torch.float32, "stage 1 changed the top block (fp32 master weights)")
        check(gen.label_rows is not None and gen.label_rows.dtype == torch.float32 and gen.label_rows.device.type == device.type, "label rows train in fp32 on the device")
        if args.precision == "bf16":
            check(transformer_blocks(gen.model)[0].mlp.up_proj.weight.dtype == torch.bfloat16, "frozen blocks held in bf16")

        learner = build_learner(LearnerConfig(model=str(bert_dir), max_length=16), task.num_labels, seed=0)
        learner.model.to(device)
        before = top.detach().clone()
        summaries = []
        cfg = DistillConfig(steps=6, inner_loop=3, learner_steps=2, learner_batch_size=16, n_repset=1, repset_dpc=4, gm_real_dpc=8,
                            gm_real_accum=1, gm_syn_dpc=4, generate_interval=1, lr=1e-3, log_every=3)
        start = time.perf_counter()
        distill(gen, learner, train, cfg, gen_cfg, seed=0, runtime=runtime, on_outer_loop=lambda st, m: summaries.append(m))
        print(f"stage 2: 6 matching steps in {time.perf_counter() - start:.1f} s, grad_sim " + ", ".join(f"{m['grad_sim']:.3f}" for m in summaries))
        check(all(math.isfinite(m[k]) for m in summaries for k in ("match_loss", "grad_sim", "syn_lm_loss")), "stage-2 losses finite")
        check(not torch.equal(top.detach(), before), "stage 2 changed the generator")

        learner = build_learner(LearnerConfig(model=str(bert_dir), max_length=16), task.num_labels, seed=0)
        learner.model.to(device)
        prepare(learner.model.body, args.precision, device)
        head = learner.model.head.weight.detach().clone()
        start = time.perf_counter()
        eval_cfg = EvaluateConfig(steps=30, batch_size=16, lr=1e-3)
        train_learner(learner, train.select(range(40)), eval_cfg, seed=0, precision=args.precision)
        result = scores(predict(learner, validation, 64, args.precision), validation.labels, "accuracy")
        print(f"evaluation run: {time.perf_counter() - start:.1f} s, accuracy {100 * result['accuracy']:.1f}% on {len(validation)} toy rows")
        check(not torch.equal(learner.model.head.weight.detach(), head) and learner.model.head.weight.dtype == torch.float32, "evaluation trained the learner (fp32 master weights)")
        check(math.isfinite(result["accuracy"]), "evaluation scored")
    print("GPU smoke: all checks passed" if device.type == "cuda" else "smoke (CPU): all checks passed")


if __name__ == "__main__":
    main()
