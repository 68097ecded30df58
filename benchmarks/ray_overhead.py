"""What Ray costs and buys on this machine, measured on real data with the packaged models.

1. Stage 1 on a 1-worker Ray Train ``TorchTrainer`` vs the same loop called in-process. Each is
   timed at two step counts; the slope is the time per step, the intercept the fixed cost
   (model loading, worker start-up, the final checkpoint). Both sides log alike: the config's
   ``pretrain.log_every``, metric lines on the console (the Ray worker also reports to Ray Train
   and MLflow at those steps only, and checkpoints at the end, as the in-process side saves).
   The CPU seconds each process spent during the longer runs show where the Ray side's extra
   time goes (Ray's daemons run at normal priority, its workers at nice 15 by default:
   ``RAY_worker_niceness`` in the environment of ``ray.init`` changes that).
2. Evaluation of the same plan (random DPC-``dpc`` subsets x seeds, MiniLM learner) run
   sequentially in one process with ``threads`` torch threads vs as Ray tasks of
   ``ray.cpus_per_eval_task`` CPUs each (one torch thread per CPU), Ray start-up included.

    python benchmarks/ray_overhead.py configs/sst2-cpu.yaml --part train --part eval
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import torch

from dilm_ray.config import Config, load_config


def _pretrain_in_process(cfg: Config) -> None:
    from dilm_ray.models.generator import build_generator
    from dilm_ray.data import load_data
    from dilm_ray.seeding import setup_torch
    from dilm_ray.tracking.loggers import ConsoleLogger
    from dilm_ray.train.pretrain import pretrain
    from dilm_ray.train.runtime import Runtime

    setup_torch(cfg)
    data = load_data(cfg, need_validation=False)
    gen = build_generator(cfg.generator, data.task, None)
    # as the Ray worker runs it, with its console logger at the same log steps
    pretrain(gen, data.train, cfg.pretrain, cfg.generator, cfg.seed, Runtime(precision=cfg.precision), ConsoleLogger("pretrain", True))
    gen.save(cfg.run_dir / "generator-plain")  # the Ray run ends with a checkpoint too


def _pretrain_on_ray(cfg: Config) -> None:
    from dilm_ray.driver.ray_train import fit_stage

    fit_stage(cfg, "pretrain")


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (process name, user + system CPU seconds so far) of every process we may read."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            times = proc.cpu_times()
            cmd = proc.info["cmdline"] or []
            name = proc.info["name"] or "?"
            if name.startswith("python") and cmd:  # Ray's Python daemons and the driver: name them by their script
                name = next((Path(c).name for c in cmd[1:] if c.endswith(".py")), name)
            out[proc.pid] = (name, times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _timed(fn, cfg: Config, usage: dict[str, float] | None = None) -> float:
    """Wall seconds of ``fn(cfg)``; ``usage`` collects the CPU seconds each process name spent meanwhile."""
    before = _cpu_seconds()
    start = time.perf_counter()
    fn(cfg)
    wall = time.perf_counter() - start
    if usage is not None:
        for pid, (name, seconds) in _cpu_seconds().items():
            usage[name] = usage.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
    return wall


def bench_train(config: str, overrides: list[str], steps: tuple[int, int]) -> None:
    from dilm_ray.driver.ray_env import ensure_ray

    base = [*overrides, "ray.num_workers=1", "name=bench-overhead"]
    start = time.perf_counter()
    ensure_ray(load_config(config, base))
    init = time.perf_counter() - start
    rows, usages = [], {}
    for label, fn in (("in-process loop", _pretrain_in_process), ("Ray Train, 1 worker", _pretrain_on_ray)):
        usage: dict[str, float] = {}
        times = [_timed(fn, load_config(config, [*base, f"pretrain.steps={n}", f"pretrain.checkpoint_every={n}"]), usage if n == steps[1] else None)
                 for n in steps]
        per_step = (times[1] - times[0]) / (steps[1] - steps[0])
        rows.append((label, times, per_step, times[0] - per_step * steps[0]))
        usages[label] = (usage, times[1])
    click.echo(f"\nstage 1, {steps[0]} and {steps[1]} steps (ray.init took {init:.1f} s, not counted below)\n")
    click.echo(f"| path | wall at {steps[0]} steps (s) | wall at {steps[1]} steps (s) | s/step | fixed cost (s) |")
    click.echo("|---|---|---|---|---|")
    for label, times, per_step, fixed in rows:
        click.echo(f"| {label} | {times[0]:.1f} | {times[1]:.1f} | {per_step:.2f} | {fixed:.1f} |")
    ratio = rows[1][2] / rows[0][2]
    click.echo(f"\nRay Train / in-process time per step: {ratio:.3f}; extra fixed cost {rows[1][3] - rows[0][3]:.1f} s")
    click.echo(f"\nCPU seconds per process during the {steps[1]}-step runs (over 1 s; a process that has exited, the Train worker, is not counted)\n")
    click.echo("| path | wall (s) | process | CPU (s) | CPU / wall |\n|---|---|---|---|---|")
    for label, (usage, wall) in usages.items():
        for name, seconds in sorted(usage.items(), key=lambda kv: -kv[1]):
            if seconds > 1.0:
                click.echo(f"| {label} | {wall:.1f} | {name} | {seconds:.1f} | {seconds / wall:.2f} |")


def bench_eval(config: str, overrides: list[str], n_sets: int, dpc: int) -> None:
    import tempfile

    from dilm_ray.algorithm.selection import select_per_class
    from dilm_ray.data import load_data
    from dilm_ray.pipeline.evaluate import LoadedSet, evaluate_groups

    cfg = load_config(config, [*overrides, f"synthesize.n_datasets={n_sets}", "evaluate.n_evals_per_dataset=1"])
    data = load_data(cfg)
    sets = [data.train.select(select_per_class(torch.zeros(len(data.train), 1), data.train.labels, dpc, "random", cfg.seed + i)) for i in range(n_sets)]
    groups = {("random", dpc): [LoadedSet(s, s.digest(), Path("-")) for s in sets]}
    results = {}
    for parallel in (False, True):
        start = time.perf_counter()
        runs = evaluate_groups(cfg, data, groups, Path(tempfile.mkdtemp()) / "runs.csv", parallel=parallel)
        results[parallel] = (time.perf_counter() - start, runs)
    (seq, seq_runs), (par, par_runs) = results[False], results[True]
    click.echo(f"\nevaluation of {n_sets} random DPC-{dpc} sets, {cfg.evaluate.steps} steps each, learner {cfg.learner.model}\n")
    click.echo("| path | wall (s) | s/run (median) | mean accuracy |")
    click.echo("|---|---|---|---|")
    for label, wall, runs in (
        (f"sequential, {cfg.threads or torch.get_num_threads()} threads", seq, seq_runs),
        (f"Ray tasks, {cfg.ray.cpus_per_eval_task:g} CPU each", par, par_runs),
    ):
        click.echo(f"| {label} | {wall:.1f} | {np.median(runs['seconds']):.1f} | {runs['accuracy'].mean():.4f} |")
    click.echo(f"\nparallel / sequential wall time: {par / seq:.3f} (speed-up {seq / par:.2f}x)")
    gap = np.abs(seq_runs["accuracy"].to_numpy() - par_runs["accuracy"].to_numpy()).max()
    click.echo(f"largest per-run accuracy difference between the two paths: {gap:.4f}")


@click.command()
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--part", "parts", multiple=True, type=click.Choice(["train", "eval"]), default=("train", "eval"))
@click.option("--steps", nargs=2, type=int, default=(10, 50), show_default=True, help="the two stage-1 step counts (the slope is over their difference)")
@click.option("--sets", "n_sets", type=int, default=6, show_default=True, help="evaluation runs (one seed per set)")
@click.option("--dpc", type=int, default=10, show_default=True)
def main(config: str, overrides: tuple[str, ...], parts: tuple[str, ...], steps: tuple[int, int], n_sets: int, dpc: int) -> None:
    if "train" in parts:
        bench_train(config, list(overrides), steps)
    if "eval" in parts:
        bench_eval(config, list(overrides), n_sets, dpc)


if __name__ == "__main__":
    main()
