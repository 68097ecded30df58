"""GPU smoke test: stage 1, stage 2 and an evaluation run of tiny ``from_config`` models in bf16.

Runs the project's training loops (``pretrain``, ``distill``, ``train_learner`` + ``predict``)
at world size 1 without Ray on one device, with a tiny Llama generator and a tiny BERT learner
built here with ``from_config`` (no hub, no downloads) and toy labelled sentences. Asserts
finite losses, that stage 1 and stage 2 change the parameters they train, that trained
parameters stay fp32 master weights while frozen ones are held in bf16, and prints what it saw.

    python scripts/gpu_smoke.py                 # CUDA (the default device of the runtime)
    python scripts/gpu_smoke.py --device cpu    # the same path on CPU, for a machine without GPU
    python scripts/gpu_smoke.py --timing        # then time stage-1 and stage-2 steps at paper shape

``--timing`` builds a GPT-2-small generator (124M parameters, ``GPT2Config()``, every parameter
trained as in ``configs/*.yaml``) and a BERT-base learner (``BertConfig()``) from config, and
times stage-1 steps of ``--batch`` rows of ``--tokens`` tokens (paper: 64 x 128) and stage-2
matching steps at ``configs/mnli.yaml``'s sizes, then projects the paper's 20,000-step stage 1.
``--layers``, ``--batch``, ``--tokens`` and ``--syn-dpc`` shrink it to check the path on a CPU.

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
    parser.add_argument("--timing", action="store_true", help="also time stage-1 and stage-2 steps at GPT-2-small / BERT-base shape")
    parser.add_argument("--batch", type=int, default=64, help="--timing: stage-1 rows per step")
    parser.add_argument("--tokens", type=int, default=128, help="--timing: tokens per row")
    parser.add_argument("--layers", type=int, default=12, help="--timing: transformer blocks of both models (12: the paper's)")
    parser.add_argument("--steps", type=int, default=6, help="--timing: stage-1 steps timed (the first is warm-up)")
    parser.add_argument("--syn-dpc", type=int, default=64, help="--timing: distill.gm_syn_dpc (configs/mnli.yaml: 64; the projection scales to it)")
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
    from dilm_ray.train.distill import DistillInputs, distill
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
        distill(gen, learner, DistillInputs(train, cfg, gen_cfg, seed=0), runtime=runtime, on_outer_loop=lambda st, m: summaries.append(m) if m else None)
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
    if args.timing:
        timing(runtime, args)


def paper_models(out: Path, layers: int, positions: int) -> tuple[Path, Path]:
    """GPT-2-small and BERT-base from config (``layers`` blocks each) over a word-level tokenizer
    padded to each model's vocabulary size, so that the embedding tables keep their shape."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", *WORDS[0], *WORDS[1], *FILLER]
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_positions=max(positions, 1024), bos_token_id=2, eos_token_id=3))
    bert = BertModel(BertConfig(num_hidden_layers=layers, max_position_embeddings=max(positions, 512), pad_token_id=0))
    for model, name, size in ((gpt2, "gpt2", gpt2.config.vocab_size), (bert, "bert", bert.config.vocab_size)):
        vocab = {t: i for i, t in enumerate(words + [f"w{i}" for i in range(size - len(words))])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        model.save_pretrained(out / name)
        fast.save_pretrained(out / name)
    return out / "gpt2", out / "bert"


def timing(runtime, args) -> None:
    """Stage-1 and stage-2 step times at paper shape on MNLI-like pairs; prints tokens/s and the
    hours ``configs/mnli.yaml`` would take at them."""
    from dilm_ray.config import DistillConfig, GeneratorConfig, LearnerConfig, PretrainConfig
    from dilm_ray.data import BUILTIN_TASKS, TextSet
    from dilm_ray.models.generator import build_generator
    from dilm_ray.models.learner import build_learner
    from dilm_ray.train.distill import DistillInputs, distill
    from dilm_ray.train.pretrain import pretrain

    task = BUILTIN_TASKS["mnli"]
    rng = np.random.default_rng(0)
    n = 4 * args.batch
    labels = np.arange(n) % task.num_labels
    # pairs that fill the context: label BOS, two parts of one-token words, <sep>, EOS
    half = (args.tokens - 3) // 2
    texts = tuple(tuple(" ".join(rng.choice([*FILLER, *WORDS[int(y) % 2]], half)) for _ in range(2)) for y in labels)
    train = TextSet(task.text_columns, texts, labels)
    with tempfile.TemporaryDirectory() as tmp:
        gpt2_dir, bert_dir = paper_models(Path(tmp), args.layers, args.tokens)
        gen_cfg = GeneratorConfig(model=str(gpt2_dir), max_length=args.tokens, train_top_layers=None, generate_batch_size=64)
        gen = build_generator(gen_cfg, task)
        gen.model.to(runtime.device)
        params = sum(p.numel() for p in gen.model.parameters())
        stamps: list[float] = []

        def on_step(state, metrics) -> None:
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        pretrain(gen, train, PretrainConfig(steps=args.steps, batch_size=args.batch, lr=1e-5, log_every=args.steps), gen_cfg, seed=0,
                 runtime=runtime, on_step=on_step)
        step = float(np.median(np.diff(stamps)))  # differences of step ends: the first step (allocation, autotuning) is left out
        tokens = args.batch * args.tokens
        print(f"stage 1 at GPT-2 shape ({params / 1e6:.0f}M parameters, {args.layers} blocks, all trained, {args.precision}): "
              f"{step:.3f} s per step of {args.batch} x {args.tokens} tokens, {tokens / step:,.0f} tokens/s; "
              f"the paper's 20,000 steps of 64 x 128 on one such device: {20000 * step * (64 * 128) / tokens / 3600:.2f} h")
        learner = build_learner(LearnerConfig(model=str(bert_dir), max_length=args.tokens), task.num_labels, seed=0)
        learner.model.to(runtime.device)
        summaries: list[dict] = []
        # configs/mnli.yaml's sizes, one outer loop of 10 matching steps and 9 learner phases
        cfg = DistillConfig(steps=10, inner_loop=10, learner_steps=20, n_repset=1, repset_dpc=min(100, n // task.num_labels), gm_real_dpc=100,
                            gm_real_accum=2, gm_syn_dpc=args.syn_dpc, generate_interval=1, lr=3e-7, lm_lambda=0.0, grad="head", log_every=10)
        distill(gen, learner, DistillInputs(train, cfg, gen_cfg, seed=0), runtime=runtime, on_outer_loop=lambda st, m: summaries.append(m) if m else None)
        m = summaries[-1]
        match, phase = m["seconds_match"] / cfg.inner_loop, m["seconds_inner_loop"] / (cfg.inner_loop - 1)
        pool = cfg.gm_syn_dpc * cfg.inner_loop * task.num_labels
        per_sample = m["seconds_generate"] / pool
        # configs/mnli.yaml: 2,000 matching steps in 200 outer loops of 10 (9 learner phases each),
        # and every 20 outer loops a pool of 64 x 10 x 20 samples per label
        hours = (2000 * match + 200 * 9 * phase + 10 * 64 * 10 * 20 * task.num_labels * per_sample) / 3600
        print(f"stage 2 at GPT-2 / BERT-base shape: matching step {match:.3f} s, learner phase ({cfg.learner_steps} steps of "
              f"{cfg.learner_batch_size}) {phase:.3f} s, generation {1000 * per_sample:.1f} ms per sample ({pool} in "
              f"{m['seconds_generate']:.1f} s); configs/mnli.yaml's stage 2 on one such device: about {hours:.2f} h")


if __name__ == "__main__":
    main()
