"""Gradient sync between 2 gloo workers: step times, the losses, and a hash of the generator.

Runs stage 1 then stage 2 (``pretrain`` and ``distill``, as the Ray Train workers call them)
in two processes joined by a gloo process group on 127.0.0.1, without Ray, one torch thread
each, and prints per step the time (seconds, rank 0) and every logged loss in full precision
(``float.hex``), then the SHA-256 of every generator parameter after each stage. Run it at
two commits to check that a change of the sync leaves training bit-identical and to time it:

    python benchmarks/grad_sync.py configs/sst2-cpu.yaml --out before.json
    python benchmarks/grad_sync.py configs/sst2-cpu.yaml --out after.json
    python benchmarks/grad_sync.py --compare before.json after.json
    python benchmarks/grad_sync.py configs/sst2-cpu.yaml --sync-only   # the all-reduces alone

``--sync-only`` times just the gradient sync of the config's trainable generator parameters
(random gradients): one all-reduce per tensor, as before issue 31, against ``GradientSync``'s
buckets (all started at ``finish()``, so without the overlap with backward that training gets).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import click
import numpy as np

DEFAULTS = (
    "pretrain.steps=12", "pretrain.log_every=1", "precision=fp32", "threads=1",
    "distill.steps=6", "distill.inner_loop=3", "distill.log_every=3", "distill.generate_interval=1",
    "distill.n_repset=1", "distill.repset_dpc=8", "distill.gm_real_dpc=4", "distill.gm_real_accum=1", "distill.gm_syn_dpc=2",
    "data.max_train_samples=400",
)


class _Recorder:
    """A ``MetricLogger`` that keeps every logged value, and ``on_step`` times."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.stamps: list[float] = [time.perf_counter()]

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))

    def on_step(self, state, metrics) -> None:
        self.stamps.append(time.perf_counter())


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, world: int, port: int, config: str, overrides: list[str], out: str, stages: tuple[str, ...]) -> None:
    import torch.distributed as dist

    from dilm_ray.config import load_config
    from dilm_ray.data import load_data
    from dilm_ray.models.generator import build_generator
    from dilm_ray.models.learner import build_learner
    from dilm_ray.seeding import setup_torch
    from dilm_ray.train.distill import DistillInputs, distill
    from dilm_ray.train.pretrain import pretrain
    from dilm_ray.train.runtime import Runtime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config(config, overrides)
    setup_torch(cfg, rank)
    runtime = Runtime.from_environment(cfg.precision)
    data = load_data(cfg, need_validation=False)
    gen = build_generator(cfg.generator, data.task, None)
    result: dict = {}
    rec = _Recorder()
    pretrain(gen, data.train, cfg.pretrain, cfg.generator, cfg.seed, runtime, rec, None, rec.on_step)
    result["pretrain"] = {"logged": rec.logged, "step_seconds": np.diff(rec.stamps).tolist(), "digest": _digest(gen.model)}
    if "distill" in stages:
        learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed + rank)
        rec = _Recorder()
        distill(gen, learner, DistillInputs(data.train, cfg.distill, cfg.generator, cfg.seed), runtime=runtime, logger=rec, on_outer_loop=rec.on_step)
        result["distill"] = {"logged": rec.logged, "step_seconds": np.diff(rec.stamps).tolist(), "digest": _digest(gen.model)}
    if rank == 0:
        Path(out).write_text(json.dumps(result, default=lambda v: float(v)))
    dist.destroy_process_group()


def _sync_worker(rank: int, world: int, port: int, config: str, overrides: list[str], out: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from dilm_ray.config import load_config
    from dilm_ray.data import load_data
    from dilm_ray.models.generator import build_generator, set_trainable
    from dilm_ray.train.runtime import Runtime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config(config, overrides)
    torch.set_num_threads(1)
    gen = build_generator(cfg.generator, load_data(cfg, need_validation=False).task, None)
    params = set_trainable(gen, cfg.generator, label_tokens=True, seed=0)
    runtime = Runtime.from_environment()
    times: dict[str, list[float]] = {"per-tensor": [], "bucketed": []}
    with runtime.gradient_sync(params) as sync:
        for _ in range(repeats):
            for kind in times:
                for p in params:
                    p.grad = torch.randn_like(p)
                dist.barrier()
                start = time.perf_counter()
                if kind == "per-tensor":
                    for p in params:
                        dist.all_reduce(p.grad)
                        p.grad /= world
                else:
                    sync.finish()
                times[kind].append(time.perf_counter() - start)
    if rank == 0:
        n = sum(p.numel() for p in params)
        Path(out).write_text(json.dumps({"tensors": len(params), "elements": n, "buckets": len(sync.buckets), **times}))
    dist.destroy_process_group()


def _hexed(logged: list) -> list:
    return [(step, {k: float(v).hex() for k, v in sorted(m.items()) if not k.startswith("seconds_")}) for step, m in logged]


@click.command()
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--out", default="grad-sync.json", show_default=True, help="Where rank 0 writes its record.")
@click.option("--compare", nargs=2, type=click.Path(exists=True), help="Compare two records instead of running.")
@click.option("--sync-only", is_flag=True, help="Time only the gradient sync: per-tensor all-reduces against GradientSync's buckets.")
@click.option("--repeats", default=20, show_default=True, help="--sync-only: syncs timed per kind.")
@click.option("--stage", "stages", multiple=True, type=click.Choice(["pretrain", "distill"]), default=("pretrain", "distill"), show_default=True)
def main(config: str | None, overrides: tuple[str, ...], out: str, compare: tuple[str, str] | None, stages: tuple[str, ...],
         sync_only: bool, repeats: int) -> None:
    if compare:
        a, b = (json.loads(Path(p).read_text()) for p in compare)
        for stage in [s for s in ("pretrain", "distill") if s in a and s in b]:
            same = _hexed(a[stage]["logged"]) == _hexed(b[stage]["logged"]) and a[stage]["digest"] == b[stage]["digest"]
            ta, tb = (np.median(r[stage]["step_seconds"][1:]) for r in (a, b))
            print(f"{stage}: losses and parameters {'bit-identical' if same else 'DIFFER'} over {len(a[stage]['logged'])} log steps; "
                  f"median step {ta:.3f} s -> {tb:.3f} s")
        return
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    if sync_only:
        mp.spawn(_sync_worker, args=(2, port, config, [*DEFAULTS, *overrides], out, repeats), nprocs=2, join=True)
        r = json.loads(Path(out).read_text())
        print(f"{r['tensors']} gradient tensors, {r['elements'] / 1e6:.1f}M elements ({4 * r['elements'] / 2**20:.0f} MB fp32), {r['buckets']} buckets")
        for kind in ("per-tensor", "bucketed"):
            print(f"  {kind}: median {1000 * np.median(r[kind]):.1f} ms, min {1000 * min(r[kind]):.1f} ms over {len(r[kind])} syncs")
        return
    mp.spawn(_worker, args=(2, port, config, [*DEFAULTS, *overrides], out, stages), nprocs=2, join=True)
    record = json.loads(Path(out).read_text())
    for stage in [s for s in ("pretrain", "distill") if s in record]:
        r = record[stage]
        print(f"{stage}: median step {np.median(r['step_seconds'][1:]):.3f} s over {len(r['step_seconds'])} steps; digest {r['digest'][:16]}")
        for step, m in r["logged"]:
            print(f"  [{step}] " + " ".join(f"{k}={v:.6f}" for k, v in sorted(m.items()) if not k.startswith("seconds_")))
    print(f"wall {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
