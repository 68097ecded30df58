"""Our K-means (``dilm_ray.algorithm.selection.kmeans``) against scikit-learn's ``KMeans`` (issue 32).
Prints measured numbers as markdown tables.

Our ``kmeans``: k-means++ seeding, at most 50 Lloyd steps on the CPU, an empty cluster keeps its
old center. scikit-learn: ``KMeans(n_clusters=k, n_init=1, random_state=seed, init="k-means++")``
(Lloyd, at most 300 steps, center-shift tolerance 1e-4, an empty cluster is moved to a far
point). K-centers is the row nearest each centroid (``nearest_to_centers``, the same for both),
so the two K-centers differ only in their K-means.

1. Speed and quality at the shapes the project uses, on real MiniLM embeddings of the config's
   train rows (``train_embeddings``, cached in ``--cache``): pools drawn from one label's rows
   (``--label``), a fresh draw per seed. Shapes: DiLM set selection from a generated pool
   (100 x 384, k=10; 200 x 384, k=20), stage 2's representative teachers (1000 x 384, k=25) and
   the K-centers coreset on a label's train rows (10,000 x 384, k=10 and k=20). Per shape and
   seed: time of K-centers (K-means + nearest rows) at the config's threads (``--timed-seeds``
   seeds, one call each: 2 threads contend with any other load on a 2-core machine) and at 1
   thread (the ``--seeds`` seeds that give the quality columns), the empty clusters of the
   returned centers (the assignment is recomputed on them), whether one more Lloyd step would
   still move a row ("not converged"), the K-means inertia (sum of squared distances to the
   nearest center, float64) and the coverage of the selected rows (the same sum to the nearest selected
   row), averaged over the seeds. scikit-learn runs on torch's threads (threadpoolctl).
2. Score on the recorded SST-2 bench (``benchmarks/results/sst2-bench``): the 10 K-centers
   coresets at DPC 10 rebuilt with scikit-learn's K-means (set i: seed i, label l: seed i + l,
   as ``coreset.coreset_sets``), evaluated with ``evaluate_groups`` (MiniLM, ``--evals-per-set``
   seeds per set: the plan's seeds ``cfg.seed + r``, the same jobs as the record's first rows),
   against the recorded runs of our K-centers sets. First checks that our ``k_centers`` rebuilds
   the recorded set 0 row for row and that the evaluation key is the recorded one. The sets'
   rows go to ``OUT/sets/``, the runs to ``OUT/runs.csv`` (resumed), the tables to ``OUT/results.md``
   (part 1 also to ``OUT/speed.md``, which ``--skip-speed`` reuses). Runs on
   ``ray.cpus_per_eval_task`` torch threads, as the record's Ray tasks did, one after another.

    python benchmarks/kmeans.py configs/bench/sst2.yaml                       # both parts
    python benchmarks/kmeans.py configs/bench/sst2.yaml --skip-eval --timed-seeds 10
    python benchmarks/kmeans.py configs/bench/sst2.yaml --skip-speed          # finish an interrupted evaluation
    python benchmarks/kmeans.py configs/bench/sst2.yaml --evals-per-set 3     # the record's 30 runs
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import click
import numpy as np
import torch

from dilm_ray.algorithm.selection import kmeans, nearest_to_centers

SHAPES = (  # (rows, k, what)
    (100, 10, "DiLM set from a pool (DPC 10, over-sample 10)"),
    (200, 20, "DiLM set from a pool (DPC 20, over-sample 10)"),
    (1000, 25, "stage-2 representative teachers (per label)"),
    (10000, 10, "K-centers coreset, a label's train rows, DPC 10"),
    (10000, 20, "K-centers coreset, a label's train rows, DPC 20"),
)
RECORD = Path("benchmarks/results/sst2-bench")
METHOD = "k_centers_sklearn"


def sklearn_centers(x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, int]:
    """scikit-learn's K-means centers (float32 [k, d]) of ``x`` and its Lloyd steps."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, random_state=seed, init="k-means++").fit(x.float().numpy())
    return torch.from_numpy(km.cluster_centers_).float(), int(km.n_iter_)


def ours_centers(x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, int]:
    return kmeans(x, k, seed)[0], -1


def sklearn_k_centers(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """K-centers with scikit-learn's K-means: the distinct row nearest each centroid."""
    return nearest_to_centers(x, sklearn_centers(x, k, seed)[0])


def select_per_class_sklearn(embeddings: torch.Tensor, labels: np.ndarray, dpc: int, seed: int) -> np.ndarray:
    """``select_per_class(..., "k_centers", seed)`` with scikit-learn's K-means (label l: seed + l)."""
    chosen = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        chosen.append(idx[sklearn_k_centers(embeddings[idx], min(dpc, len(idx)), seed + int(label)).numpy()])
    return np.concatenate(chosen)


def quality(x: torch.Tensor, centers: torch.Tensor, picked: torch.Tensor) -> dict:
    """Empty clusters of ``centers`` on ``x``, whether a further Lloyd step moves a row,
    K-means inertia and the selected rows' coverage (float64 sums of squared distances)."""
    x64 = x.double()
    d2 = torch.cdist(x64, centers.double()).pow(2)
    assign = d2.argmin(1)
    counts = torch.bincount(assign, minlength=len(centers))
    empty = int((counts == 0).sum())
    means = torch.stack([x64[assign == j].mean(0) if counts[j] else centers[j].double() for j in range(len(centers))])
    moved = not torch.equal(torch.cdist(x64, means).argmin(1), assign)
    return {
        "empty": empty,
        "moved": moved,
        "inertia": float(d2.min(1).values.sum()),
        "coverage": float(torch.cdist(x64, x64[picked]).pow(2).min(1).values.sum()),
    }


def speed_tables(emb: torch.Tensor, labels: np.ndarray, label: int, seeds: int, timed_seeds: int, threads: int) -> str:
    """Per shape: ``timed_seeds`` calls of each K-centers at ``threads`` threads (the config's),
    then ``seeds`` calls at 1 thread, which are timed too and give the quality columns."""
    try:
        from threadpoolctl import threadpool_limits

        limit: Callable = threadpool_limits
        pool_note = "scikit-learn on the same threads (threadpoolctl)"
    except ImportError:
        limit, pool_note = lambda n: nullcontext(), "threadpoolctl missing: scikit-learn on its default threads"
    rows_of_label = np.flatnonzero(labels == label)
    fns = {"ours": ours_centers, "sklearn": sklearn_centers}

    def pool(n: int, seed: int) -> torch.Tensor:
        return emb[np.sort(np.random.default_rng(seed).choice(rows_of_label, size=min(n, len(rows_of_label)), replace=False))].contiguous()

    def call(name: str, x: torch.Tensor, k: int, seed: int) -> tuple[float, tuple]:
        start = time.perf_counter()
        centers, iters = fns[name](x, k, seed)
        picked = nearest_to_centers(x, centers)
        return time.perf_counter() - start, (centers, iters, picked)

    for name in fns:  # warm-up (imports, allocator) on the smallest shape
        call(name, pool(100, 0), 10, 0)
    speed, empty, inert = [], [], []
    for n, k, what in SHAPES:
        shape = f"{n} x {emb.shape[1]}, k={k}"
        t_cfg: dict[str, list[float]] = {m: [] for m in fns}
        torch.set_num_threads(threads)
        with limit(threads):
            for seed in range(timed_seeds):
                x = pool(n, seed)
                for name in fns:
                    t_cfg[name].append(call(name, x, k, seed)[0])
        stats: dict[str, dict[str, list]] = {m: {"t": [], "q": [], "pick": [], "iters": []} for m in fns}
        torch.set_num_threads(1)
        with limit(1):
            for seed in range(seeds):
                x = pool(n, seed)
                for name in fns:
                    t, (centers, iters, picked) = call(name, x, k, seed)
                    stats[name]["t"].append(t)
                    stats[name]["q"].append(quality(x, centers, picked))
                    stats[name]["pick"].append(set(picked.tolist()))
                    stats[name]["iters"].append(iters)
        torch.set_num_threads(threads)
        c_o, c_s = np.median(t_cfg["ours"]), np.median(t_cfg["sklearn"])
        t_o, t_s = np.median(stats["ours"]["t"]), np.median(stats["sklearn"]["t"])
        speed.append(f"| {shape} | {what} | {1e3 * c_o:.0f} | {1e3 * c_s:.0f} | {c_o / c_s:.1f} | {1e3 * t_o:.0f} | {1e3 * t_s:.0f} | {t_o / t_s:.1f} |")
        qo, qs = stats["ours"]["q"], stats["sklearn"]["q"]
        empty.append(
            f"| {shape} | {sum(q['empty'] > 0 for q in qo)}/{seeds} | {sum(q['empty'] for q in qo)} | {sum(q['moved'] for q in qo)}/{seeds} "
            f"| {sum(q['empty'] > 0 for q in qs)}/{seeds} | {np.mean(stats['sklearn']['iters']):.1f} |"
        )
        io, is_ = np.array([q["inertia"] for q in qo]), np.array([q["inertia"] for q in qs])
        co, cs = np.array([q["coverage"] for q in qo]), np.array([q["coverage"] for q in qs])
        shared = np.mean([len(a & b) / k for a, b in zip(stats["ours"]["pick"], stats["sklearn"]["pick"])])
        inert.append(
            f"| {shape} | {io.mean():.1f} | {is_.mean():.1f} | {100 * (io / is_ - 1).mean():+.2f}% | {(io < is_).sum()}/{(io > is_).sum()} "
            f"| {co.mean():.1f} | {cs.mean():.1f} | {100 * (co / cs - 1).mean():+.2f}% | {100 * shared:.0f}% |"
        )
        click.echo(f"[speed] {shape}: {threads} threads ours {1e3 * c_o:.0f} ms sklearn {1e3 * c_s:.0f} ms; 1 thread ours {1e3 * t_o:.0f} ms sklearn {1e3 * t_s:.0f} ms", err=True)
    src = f"real MiniLM (minilm-l6) embeddings of the bench's train rows of label {label} (10,000 rows), a fresh random draw of the pool's rows per seed"
    return "\n".join([
        f"### Speed (K-centers = K-means + nearest rows; median ms per call; {pool_note})",
        "",
        f"Data: {src}. Columns at {threads} threads (the config's): the median of seeds 0-{timed_seeds - 1}, one call each; "
        f"at 1 thread: the median of the {seeds} seeds of the quality tables below. One warm-up call of each before.",
        "",
        f"| shape | used for | ours ms ({threads} thr) | sklearn ms ({threads} thr) | ours / sklearn | ours ms (1 thr) | sklearn ms (1 thr) | ours / sklearn |",
        "|---|---|---|---|---|---|---|---|",
        *speed,
        "",
        f"### Empty clusters ({seeds} seeds; the assignment recomputed on the returned centers)",
        "",
        "| shape | ours: runs with an empty cluster | ours: empty clusters in all | ours: runs not converged (a further Lloyd step moves a row) | sklearn: runs with an empty cluster | sklearn: mean Lloyd steps |",
        "|---|---|---|---|---|---|",
        *empty,
        "",
        f"### Inertia and coverage (mean over {seeds} seeds; sums of squared distances)",
        "",
        "Inertia: of the rows to their nearest K-means center; coverage: of the rows to their nearest *selected row* (what K-centers keeps). "
        "Delta: mean of ours / sklearn - 1 per seed (negative: ours is tighter). Shared: selected rows in both, mean over seeds.",
        "",
        "| shape | ours inertia | sklearn inertia | delta | seeds ours lower / higher | ours coverage | sklearn coverage | delta | shared rows |",
        "|---|---|---|---|---|---|---|---|---|",
        *inert,
    ])


def recorded_rows(path: Path) -> list[int]:
    return [json.loads(line)["row"] for line in path.read_text().splitlines() if line.strip()]


def score_tables(cfg, data, emb: torch.Tensor, out: Path, evals_per_set: int) -> str:
    import pandas as pd
    from scipy.stats import ttest_ind, ttest_rel

    from dilm_ray.algorithm.selection import select_per_class
    from dilm_ray.pipeline.evaluate import LoadedSet, evaluate_groups

    labels = np.asarray(data.train.labels)
    dpc, learner = 10, cfg.learner.model
    ours0 = select_per_class(emb, labels, dpc, "k_centers", seed=0)
    rec0 = recorded_rows(RECORD / f"distilled/k_centers/dpc{dpc}/set0/rows.jsonl")
    same0 = ours0.tolist() == rec0
    click.echo(f"[check] our k_centers set 0 == recorded rows.jsonl: {same0}", err=True)
    if not same0:
        raise click.ClickException("our k_centers does not rebuild the recorded set 0: the embeddings or data differ from the bench's")
    sets, shared = [], []
    for i in range(cfg.synthesize.n_datasets):
        rows = select_per_class_sklearn(emb, labels, dpc, seed=i)
        folder = out / "sets" / METHOD / f"dpc{dpc}" / f"set{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rows.jsonl").write_text("".join(json.dumps({"row": int(r)}) + "\n" for r in rows))
        subset = data.train.select(rows)
        sets.append(LoadedSet(subset, subset.digest(), folder / "rows.jsonl"))
        shared.append(len(set(rows.tolist()) & set(recorded_rows(RECORD / f"distilled/k_centers/dpc{dpc}/set{i}/rows.jsonl"))))
    click.echo(f"[sets] rows shared with our recorded sets: {shared} of {2 * dpc}", err=True)
    # The record's runs were Ray tasks of ray.cpus_per_eval_task CPUs, each on that many torch threads
    # (driver.executors._remote_call): run in this process on as many.
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_eval_task)))
    start = time.perf_counter()
    runs = evaluate_groups(cfg, data, {(METHOD, dpc): sets}, out / "runs.csv", [learner], {learner: evals_per_set}, resume=True, parallel=False,
                           log=lambda s: click.echo(s, err=True),
                           on_run=lambda rows: click.echo(f"[evaluate] run {len(rows)}: {rows[-1]['accuracy']:.4f} in {rows[-1]['seconds']:.0f} s", err=True))
    click.echo(f"[evaluate] {time.perf_counter() - start:.0f} s this invocation", err=True)
    rec = pd.read_csv(RECORD / "bench-cpu-dpc10/runs.csv", dtype={"eval_key": str})
    rec = rec[(rec.method == "k_centers") & (rec.dpc == dpc) & (rec.learner == learner)]
    mine = runs[(runs.method == METHOD) & (runs.learner == learner)]
    keys = set(mine.eval_key.astype(str)) | set(rec.eval_key)
    if len(keys) != 1:
        raise click.ClickException(f"evaluation keys differ from the record's: {keys}")
    matched = rec.merge(mine[["set_index", "seed", "accuracy"]], on=["set_index", "seed"], suffixes=("_ours", "_sk"))
    a_all, a_m, b = 100 * rec.accuracy.to_numpy(), 100 * matched.accuracy_ours.to_numpy(), 100 * mine.accuracy.to_numpy()

    def line(name: str, v: np.ndarray, p: str) -> str:
        return f"| {name} | {v.mean():.2f} ± {v.std(ddof=1):.2f} | {len(v)} | {p} |"

    per_set = []
    for i in range(cfg.synthesize.n_datasets):
        o = 100 * rec[rec["set_index"] == i].accuracy
        s = 100 * mine[mine["set_index"] == i].accuracy
        per_set.append(f"| {i} | {shared[i]}/{2 * dpc} | {o.mean():.1f} ({len(o)}) | {s.mean():.1f} ({len(s)}) |")
    secs = mine.seconds.to_numpy()
    return "\n".join([
        f"### Score: SST-2 K-centers coresets, DPC {dpc}, learner {learner} (accuracy %, mean ± std over runs)",
        "",
        f"Our k_centers rebuilds the recorded set 0 row for row: {same0}; evaluation key {keys.pop()} (the record's). "
        f"sklearn sets: {evals_per_set} seed(s) per set (seeds {cfg.seed} + r as the plan gives), {len(b)} runs, "
        f"{np.median(secs):.0f} s median per run here (training + prediction, {max(1, int(cfg.ray.cpus_per_eval_task))} torch thread(s) "
        "as the record's Ray tasks; the record: 98 s median).",
        "",
        "| sets | accuracy | runs | Welch p vs sklearn |",
        "|---|---|---|---|",
        line("ours (recorded, all runs)", a_all, f"{ttest_ind(a_all, b, equal_var=False).pvalue:.3f}"),
        line(f"ours (recorded, the {len(a_m)} runs with sklearn's set index and seed)", a_m,
             f"{ttest_ind(a_m, matched.accuracy_sk.to_numpy() * 100, equal_var=False).pvalue:.3f} (paired t: {ttest_rel(a_m, 100 * matched.accuracy_sk.to_numpy()).pvalue:.3f})"),
        line("sklearn KMeans", b, "-"),
        "",
        "| set | rows shared with ours | ours mean (runs) | sklearn mean (runs) |",
        "|---|---|---|---|",
        *per_set,
    ])


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False), default="configs/bench/sst2.yaml")
@click.option("--seeds", default=10, show_default=True, help="K-means seeds per shape (speed, empty clusters, inertia)")
@click.option("--timed-seeds", default=3, show_default=True, help="seeds timed at the config's threads (one call each)")
@click.option("--label", default=0, show_default=True, help="the label whose train rows the pools are drawn from")
@click.option("--evals-per-set", default=1, show_default=True, help="evaluation seeds per sklearn set (the record has 3)")
@click.option("--skip-eval", is_flag=True, help="speed and quality only (no coresets or evaluation)")
@click.option("--skip-speed", is_flag=True, help="reuse OUT/speed.md from an earlier invocation (e.g. to finish an interrupted evaluation)")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/dilm-kmeans-cache"), show_default=True,
              help="where the train embeddings are cached")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results/kmeans"), show_default=True)
def main(config: str, seeds: int, timed_seeds: int, label: int, evals_per_set: int, skip_eval: bool, skip_speed: bool, cache: Path, out: Path) -> None:
    from dilm_ray.config import load_config
    from dilm_ray.data import load_data
    from dilm_ray.models.learner import build_learner
    from dilm_ray.seeding import setup_torch
    from dilm_ray.train.embeddings import train_embeddings

    wall, load_start = time.perf_counter(), os.getloadavg()[0]
    cfg = load_config(config, ["synthesize.n_datasets=10", "evaluate.n_evals_per_dataset=3", "evaluate.full_data_samples=null"])
    setup_torch(cfg)
    data = load_data(cfg)
    learner = build_learner(cfg.learner, data.task.num_labels, cfg.seed)
    start = time.perf_counter()
    emb = train_embeddings(cache, data.train, learner, cfg.precision)
    click.echo(f"[embeddings] {tuple(emb.shape)} in {time.perf_counter() - start:.0f} s", err=True)
    del learner
    out.mkdir(parents=True, exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if ln.startswith("Model name")), platform.processor())
    command = " ".join(["python benchmarks/kmeans.py", *sys.argv[1:]])

    def write(parts: list[str]) -> str:
        report = "\n\n".join([
            "# K-means: ours against scikit-learn (issue 32)",
            f"CPU: {cpu}; torch {torch.__version__}, config threads {cfg.threads}; command: `{command}`; "
            f"wall time {time.perf_counter() - wall:.0f} s; 1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
            "(the machine is shared: timings include other load).",
            *parts,
        ]) + "\n"
        (out / "results.md").write_text(report)
        return report

    if skip_speed and (out / "speed.md").is_file():
        speed = (out / "speed.md").read_text().strip() + "\n\n(Speed, empty clusters and inertia: from an earlier invocation, kept in speed.md.)"
    else:
        speed = speed_tables(emb, np.asarray(data.train.labels), label, seeds, timed_seeds, cfg.threads or torch.get_num_threads())
        (out / "speed.md").write_text(speed + "\n")
    parts = [speed]
    write(parts)  # the speed part is kept even if the evaluation is interrupted
    if not skip_eval:
        parts.append(score_tables(cfg, data, emb, out, evals_per_set))
    click.echo(write(parts))


if __name__ == "__main__":
    main()
