"""fp32 against bf16 on each hot path, side by side, on this machine. Prints measured numbers.

Hot paths, at the shapes of ``CONFIG`` (default: the SST-2 bench profile) with the packaged models
and real rows:

- ``stage-1 step``: one ``pretrain`` step (generator.train_top_layers trained, label tokens too),
  a batch of pretrain.batch_size rows long enough to fill generator.max_length tokens (16 x 40
  in the bench profile);
- ``stage-1 step, random rows``: the same step on *random* train rows, pretrain.batch_size a
  step (16: SST-2's are ~45% padding), batched three ways: ``padded`` (right-padded to the
  batch's longest row: the code before packing), ``packed`` (``generator.packing``: the rows'
  samples packed into rows of max_length, what ``pretrain`` runs), and ``bucketed`` (the
  alternative to packing: batches of rows of similar length, cut from a length-sorted pool of
  max(16, steps) batches, padded). Reports real (non-pad) tokens/s and the padding fraction of the batches;
  padded and packed time the same batches;
- ``stage-2 step``: one matching step (``matching_step``: learner head gradients of the real and
  synthetic batches, generator LM losses, backward into the generator) and the learner's inner
  loop of distill.learner_steps;
- ``sampling``: ``--sample-rows`` samples of one label (generator.generate_batch_size a batch),
  ours (finished rows leave the batch) against ``transformers``' ``generate`` with the same
  top-k / top-p / temperature;
- ``evaluation run``: ``train_learner`` (evaluate.steps on a DPC-10 random set) and ``predict``
  on the validation split.

Each path is timed over ``--repeats`` calls after one warm-up call. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and attention, forward and
backward) of one call; the peak of each precision is measured here with a ``--probe`` cubed
matrix product. Nothing is asserted: read the table.

    python benchmarks/speed.py                       # bench shapes, both precisions
    python benchmarks/speed.py configs/sst2-cpu.yaml --path stage1 --repeats 5
"""

from __future__ import annotations

import time
from collections.abc import Callable

import click
import numpy as np
import torch

from dilm_ray.config import Config, load_config
from dilm_ray.data import TextSet

PATHS = ("stage1", "stage1-random", "stage2", "sampling", "evaluation")
BATCHINGS = ("padded", "packed", "bucketed")


def matmul_peak(n: int, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """FLOP/s of an n x n x n matrix product in ``dtype`` (best of repeated calls for ~``seconds``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median seconds per call, FLOPs of one call) after one warm-up call."""
    from torch.utils.flop_counter import FlopCounterMode

    fn()
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(counter.get_total_flops())


def _rows(data: TextSet, n: int, seed: int) -> TextSet:
    return data.select(np.random.default_rng(seed).choice(len(data), size=n, replace=False))


def stage1(cfg: Config, data, precision: str, repeats: int) -> dict:
    """Steps of one ``pretrain`` call, timed between its step callbacks (the first step, which
    also builds the optimizer, is the warm-up); FLOPs of a separate one-step call."""
    from torch.utils.flop_counter import FlopCounterMode

    from dilm_ray.models.generator import build_generator
    from dilm_ray.train.pretrain import pretrain
    from dilm_ray.train.runtime import Runtime

    gen = build_generator(cfg.generator, data.task)
    runtime = Runtime(precision=precision)
    # rows that fill generator.max_length: every batch has the same shape, batch_size x max_length
    # (random rows would set each step's width by its longest row, and its cost with it)
    pool = _rows(data.train, min(len(data.train), 5000), cfg.seed)
    full = [i for i in range(len(pool)) if len(gen.encode(pool.texts[i], int(pool.labels[i]))) >= gen.max_length]
    train = pool.select(full[: (repeats + 2) * cfg.pretrain.batch_size])
    tokens = cfg.pretrain.batch_size * float(gen.batch(train.select(range(cfg.pretrain.batch_size)))["attention_mask"].sum(1).float().mean())
    counter = FlopCounterMode(display=False)
    with counter:
        pretrain(gen, train, cfg.pretrain.model_copy(update={"steps": 1, "log_every": 1}), cfg.generator, cfg.seed, runtime)
    stamps: list[float] = []
    steps_cfg = cfg.pretrain.model_copy(update={"steps": repeats + 1, "log_every": repeats + 1})
    pretrain(gen, train, steps_cfg, cfg.generator, cfg.seed, runtime, on_step=lambda st, m: stamps.append(time.perf_counter()))
    return {"seconds": float(np.median(np.diff(stamps))), "flops": float(counter.get_total_flops()), "tokens": tokens}


def stage1_random(cfg: Config, data, precision: str, repeats: int) -> list[dict]:
    """One stage-1 step (``lm_losses`` forward and backward, clipping, AdamW) on random rows,
    padded, packed and bucketed (see the module docstring). Each variant: the median over
    ``repeats`` steps after one warm-up step, real tokens/s over those steps, the padding
    fraction of the positions the body ran on."""
    from dilm_ray.models.generator import build_generator, set_trainable
    from dilm_ray.precision import autocast, prepare

    gen = build_generator(cfg.generator, data.task)
    params = [p for p in set_trainable(gen, cfg.generator, label_tokens=True, seed=cfg.seed) if p.requires_grad]
    prepare(gen.model, precision)
    optimizer = torch.optim.AdamW(params, lr=cfg.pretrain.lr)
    gen.model.train()
    size, steps = cfg.pretrain.batch_size, repeats + 1
    rng = np.random.default_rng(cfg.seed)
    random_batches = [data.train.select(rng.choice(len(data.train), size, replace=False)) for _ in range(steps)]
    n_buckets = max(16, steps)
    pool = data.train.select(rng.choice(len(data.train), size * n_buckets, replace=False))
    order = np.argsort([len(gen.encode(t, int(y))) for t, y in zip(pool.texts, pool.labels)], kind="stable")
    buckets = [pool.select(order[i * size : (i + 1) * size]) for i in range(n_buckets)]
    bucket_batches = [buckets[i] for i in rng.choice(n_buckets, steps, replace=False)]

    def step(batch: TextSet) -> None:
        with autocast(precision, gen.device):
            loss = gen.lm_losses(batch).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.pretrain.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out = []
    for batching in BATCHINGS:
        gen.packing = batching == "packed"
        batches = bucket_batches if batching == "bucketed" else random_batches
        seconds, real, positions = [], 0, 0
        for i, batch in enumerate(batches):
            shape = (gen.packed_batch if gen.packing else gen.batch)(batch)["input_ids"].shape
            start = time.perf_counter()
            step(batch)
            if i:  # the first step is the warm-up
                seconds.append(time.perf_counter() - start)
                real += sum(len(gen.encode(t, int(y))) for t, y in zip(batch.texts, batch.labels))
                positions += shape[0] * shape[1]
        out.append({
            "path": f"stage-1 step, random rows, {batching}", "seconds": float(np.median(seconds)), "flops": float("nan"),
            "tokens": real / len(seconds), "real_tokens_per_s": real / sum(seconds), "padding": 1 - real / positions,
        })
    return out


def stage2(cfg: Config, data, precision: str, repeats: int) -> dict:
    from dilm_ray.models.generator import build_generator, set_trainable
    from dilm_ray.models.learner import build_learner
    from dilm_ray.precision import prepare
    from dilm_ray.train.distill import Cycle, advance_learner, matching_step
    from dilm_ray.train.runtime import Runtime

    gen = build_generator(cfg.generator, data.task)
    learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed)
    runtime = Runtime(precision=precision)
    params = [p for p in set_trainable(gen, cfg.generator, label_tokens=False, seed=cfg.seed) if p.requires_grad]
    prepare(gen.model, precision)
    prepare(learner.model.body, precision)
    d, rng = cfg.distill, np.random.default_rng(cfg.seed)
    labels = range(data.task.num_labels)
    real = [data.train.select(rng.choice(data.train.indices_of(y), d.gm_real_dpc * d.gm_real_accum, replace=False)) for y in labels]
    # the synthetic batch: real rows stand in for generated ones (same lengths, no sampling cost here)
    syn = TextSet.concat([data.train.select(rng.choice(data.train.indices_of(y), d.gm_syn_dpc, replace=False)) for y in labels])
    lm = Cycle(np.arange(len(data.train)), d.lm_batch_size, rng)
    learner_batches = Cycle(np.arange(len(data.train)), d.learner_batch_size, rng)
    optimizer = torch.optim.AdamW(learner.model.parameters(), lr=d.learner_lr)

    def step() -> None:
        matching_step(gen, learner, real, syn, d, data.train, lm, runtime)
        for p in params:
            p.grad = None
        advance_learner(learner, optimizer, data.train, learner_batches, d.learner_steps, runtime)

    seconds, flops = timed(step, repeats)
    return {"seconds": seconds, "flops": flops, "tokens": None}


def sampling(cfg: Config, data, precision: str, repeats: int, rows: int, reference: bool) -> list[dict]:
    from dilm_ray.models.generator import build_generator
    from dilm_ray.precision import autocast, prepare

    gen = build_generator(cfg.generator, data.task)
    gen.model.requires_grad_(False)
    prepare(gen.model, precision)
    g = cfg.generator.model_copy(update={"generate_batch_size": min(rows, cfg.generator.generate_batch_size)})
    counts = []

    def ours() -> None:
        with autocast(precision, gen.device):
            out = gen.sample(0, rows, g, torch.Generator().manual_seed(cfg.seed))
        counts.append(sum(len(s) + 1 for s in out))  # EOS included

    seconds, flops = timed(ours, repeats)
    result = [{"path": "sampling (ours)", "seconds": seconds, "flops": flops, "tokens": int(np.median(counts))}]
    if reference:
        prompt = torch.tensor([gen.prompt(0)] * g.generate_batch_size, dtype=torch.long)
        new = gen.max_length - prompt.shape[1]
        hf_counts = []

        def hf() -> None:
            torch.manual_seed(cfg.seed)
            with autocast(precision, gen.device):
                for start in range(0, rows, g.generate_batch_size):
                    size = min(g.generate_batch_size, rows - start)
                    out = gen.model.generate(
                        input_ids=prompt[:size], attention_mask=torch.ones_like(prompt[:size]), do_sample=True, top_k=g.top_k, top_p=g.top_p,
                        temperature=g.temperature, max_new_tokens=new, eos_token_id=gen.eos_id, pad_token_id=gen.pad_id,
                        suppress_tokens=gen.banned_ids,
                    )
                    body = out[:, prompt.shape[1] :]
                    hf_counts.append(int(((body != gen.pad_id) | (body == gen.eos_id)).sum()))

        seconds, flops = timed(hf, repeats)
        result.append({"path": "sampling (transformers generate)", "seconds": seconds, "flops": flops, "tokens": int(np.median(hf_counts))})
    return result


def evaluation(cfg: Config, data, precision: str, repeats: int) -> dict:
    from dilm_ray.evaluation.train_eval import predict, train_learner
    from dilm_ray.models.learner import build_learner
    from dilm_ray.precision import prepare
    from dilm_ray.algorithm.selection import select_per_class

    learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed)
    prepare(learner.model.body, precision)
    subset = data.train.select(select_per_class(torch.zeros(len(data.train), 1), data.train.labels, 10, "random", cfg.seed))

    def run() -> None:
        train_learner(learner, subset, cfg.evaluate, cfg.seed, precision)
        predict(learner, data.validation, cfg.evaluate.eval_batch_size, precision)

    seconds, flops = timed(run, repeats)
    return {"seconds": seconds, "flops": flops, "tokens": None}


@click.command()
@click.argument("config", default="configs/bench/sst2.yaml")
@click.argument("overrides", nargs=-1)
@click.option("--path", "paths", multiple=True, type=click.Choice(PATHS), help="hot paths to time (repeatable; default all)")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "bf16"]), help="default both")
@click.option("--repeats", type=int, default=3, show_default=True, help="timed calls per path after one warm-up")
@click.option("--sample-rows", type=int, default=64, show_default=True, help="samples drawn per sampling call")
@click.option("--probe", type=int, default=2048, show_default=True, help="n of the n^3 matrix-product peak probe")
@click.option("--no-reference", is_flag=True, help="skip transformers' generate")
def main(config, overrides, paths, precisions, repeats, sample_rows, probe, no_reference) -> None:
    import sys

    from dilm_ray.data import load_data
    from dilm_ray.errors import UserError
    from dilm_ray.seeding import setup_torch

    try:
        cfg = load_config(config, list(overrides))
        setup_torch(cfg)
        data = load_data(cfg)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    paths = paths or PATHS
    precisions = precisions or ("fp32", "bf16")
    peaks = {p: matmul_peak(probe, torch.bfloat16 if p == "bf16" else torch.float32) for p in precisions}
    click.echo(f"{cfg.name}: {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    click.echo("peak (" + f"{probe}^3 matmul): " + ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s" for p in precisions))
    rows = []
    for path in paths:
        for precision in precisions:
            torch.manual_seed(cfg.seed)
            if path == "stage1":
                found = [{"path": "stage-1 step", **stage1(cfg, data, precision, repeats)}]
            elif path == "stage1-random":
                found = stage1_random(cfg, data, precision, repeats)
            elif path == "stage2":
                found = [{"path": "stage-2 step + inner loop", **stage2(cfg, data, precision, repeats)}]
            elif path == "sampling":
                found = sampling(cfg, data, precision, repeats, sample_rows, not no_reference)
            else:
                found = [{"path": "evaluation run", **evaluation(cfg, data, precision, repeats)}]
            for r in found:
                r["precision"] = precision
                rows.append(r)
                click.echo(f"  {r['path']} [{precision}]: {r['seconds']:.3f} s", err=True)
    fp32 = {r["path"]: r["seconds"] for r in rows if r["precision"] == "fp32"}
    click.echo("\n| hot path | precision | seconds | tokens/s | GFLOP/s | % of peak | speed-up vs fp32 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        rate = r["flops"] / r["seconds"]
        tokens = f"{r['tokens'] / r['seconds']:.0f}" if r["tokens"] else "-"
        speedup = f"{fp32[r['path']] / r['seconds']:.2f}x" if r["path"] in fp32 else "-"
        if np.isnan(rate):
            click.echo(f"| {r['path']} | {r['precision']} | {r['seconds']:.3f} | {tokens} | - | - | {speedup} |")
        else:
            click.echo(f"| {r['path']} | {r['precision']} | {r['seconds']:.3f} | {tokens} | {rate / 1e9:.0f} | {100 * rate / peaks[r['precision']]:.0f} | {speedup} |")
    random_rows = [r for r in rows if "real_tokens_per_s" in r]
    if random_rows:
        click.echo("\n| stage-1 step, random rows | precision | seconds/step | real tokens/s | padding | real tokens/s vs padded |\n|---|---|---|---|---|---|")
        padded = {r["precision"]: r["real_tokens_per_s"] for r in random_rows if r["path"].endswith("padded")}
        for r in random_rows:
            click.echo(
                f"| {r['path'].rsplit(', ', 1)[1]} | {r['precision']} | {r['seconds']:.3f} | {r['real_tokens_per_s']:.0f} | "
                f"{100 * r['padding']:.0f}% | {r['real_tokens_per_s'] / padded[r['precision']]:.2f}x |"
            )


if __name__ == "__main__":
    main()
