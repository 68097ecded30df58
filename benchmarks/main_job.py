"""The main job (``make run``: ``dilm-ray run configs/sst2-cpu.yaml``) as an experiment over seeds.

Each seed's run is recorded under ``benchmarks/results/main-job/seed<N>/`` (the README's table
is ``seed42/``; runs of another CPU kind, or made before a change to what the stages compute, go
to a folder of their own with ``--into``, e.g. ``avx2-fp32/``): its ``table.md``,
``runs.csv``, ``timing.md``, ``fingerprint.json`` (the digest of every stage's output, the
commit, the CPU) and ``record.json`` (date, command). ``report`` compares DiLM with each
baseline on per-set means (one value per distilled set: the mean over its learner seeds):
per seed, the difference of means and Welch's p; over the seeds, a stratified permutation test
(``dilm_ray.evaluation.stats.stratified_permutation_p``: method labels permuted within each
seed, so a seed's shift of both methods cancels). Herding's one deterministic set gives no
per-set spread and is left out of the tests.

    dilm-ray run configs/sst2-cpu.yaml seed=43 name=sst2-cpu-seed43
    python benchmarks/main_job.py record runs/sst2-cpu-seed43
    python benchmarks/main_job.py report                  # every recorded seed; writes summary.md

The profile is chosen the same way, on held-out train rows (``data.dev_samples``): each
candidate's runs recorded with ``--into <root>/<candidate>`` at 2+ seeds, then ``choose <root>``
ranks the candidates by DiLM's mean over seeds and tests each against the leader and the baselines.
"""

from __future__ import annotations

import datetime
import json
import re
import shlex
import shutil
from pathlib import Path

import click
import numpy as np
import pandas as pd

from dilm_ray.evaluation.stats import stratified_permutation_p, stratified_power, welch_p
from dilm_ray.pipeline.record import FINGERPRINT_FILE

RECORD = Path(__file__).parent / "results" / "main-job"
FILES = ("table.md", "runs.csv", "timing.md", FINGERPRINT_FILE)


def per_set(runs: pd.DataFrame, method: str) -> np.ndarray:
    """The mean score (%) of each of ``method``'s sets, in set order. Raises ClickException when
    ``runs`` holds more than one learner or DPC (the main job has one of each)."""
    cells = runs[["learner", "dpc"]].drop_duplicates()
    if len(cells) != 1:
        raise click.ClickException(f"runs of {len(cells)} (learner, DPC) cells: the main job has one")
    part = runs[runs.method == method]
    return 100 * part.groupby("set_index")["score"].mean().to_numpy()


def seeds_recorded(root: Path) -> dict[int, pd.DataFrame]:
    """seed -> its ``runs.csv``, for every ``seed<N>/`` under ``root``."""
    found = {}
    for folder in sorted(root.glob("seed*")):
        seed = re.fullmatch(r"seed(\d+)", folder.name)
        if seed and (folder / "runs.csv").is_file():
            found[int(seed.group(1))] = pd.read_csv(folder / "runs.csv", dtype={"set_digest": str})
    return found


def comparison(by_seed: dict[int, pd.DataFrame], baseline: str, reference: str = "dilm") -> dict:
    """``reference`` against ``baseline``: per seed (sets, means, difference, Welch p) and the
    stratified p over the seeds."""
    strata, rows = [], []
    for seed, runs in by_seed.items():
        a, b = per_set(runs, reference), per_set(runs, baseline)
        strata.append((a, b))
        rows.append({"seed": seed, "sets": (len(a), len(b)), "reference": a.mean(), "baseline": b.mean(), "difference": a.mean() - b.mean(),
                     "welch_p": welch_p(list(a), list(b))})
    power, sets = stratified_power(strata)
    return {"baseline": baseline, "per_seed": rows, "stratified_p": stratified_permutation_p(strata),
            "mean_difference": float(np.mean([r["difference"] for r in rows])), "power": power, "sets_for_80": sets}


def report_markdown(by_seed: dict[int, pd.DataFrame], baselines: tuple[str, ...]) -> str:
    seeds = ", ".join(map(str, by_seed))
    lines = [
        f"DiLM against each baseline on per-set means (%), seeds {seeds}; p over the seeds: stratified permutation test "
        "(labels permuted within each seed, 20,000 permutations).",
        "",
        "| baseline | seed | sets (DiLM, baseline) | DiLM | baseline | DiLM - baseline | Welch p |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for baseline in baselines:
        found = comparison(by_seed, baseline)
        for r in found["per_seed"]:
            lines.append(f"| {baseline} | {r['seed']} | {r['sets'][0]}, {r['sets'][1]} | {r['reference']:.1f} | {r['baseline']:.1f} | "
                         f"{r['difference']:+.1f} | {r['welch_p']:.3g} |")
        ahead = sum(r["difference"] > 0 for r in found["per_seed"])
        summary.append(f"| {baseline} | {found['mean_difference']:+.1f} | {ahead} of {len(found['per_seed'])} | {found['stratified_p']:.3g} | "
                       f"{found['power']:.2f} | {found['sets_for_80']:.0f} |")
    return "\n".join([
        *lines, "", "| baseline | mean difference over seeds | seeds with DiLM ahead | stratified p | power at p < 0.05 | sets per method per seed for 80% (at these seeds) |",
        "|---|---|---|---|---|---|", *summary, "",
        "Power and sets: normal approximation, taking the observed lead and per-set variances at face value "
        "(`dilm_ray.evaluation.stats.stratified_power`), for planning; not a test.",
    ])


def choice_markdown(candidates: dict[str, dict[int, pd.DataFrame]], baselines: tuple[str, ...]) -> str:
    """Candidates ranked by DiLM's mean over seeds (each seed's mean over its sets), each with its
    per-seed means, the stratified p against the leader's DiLM and DiLM's against each baseline
    (the candidate's own baseline rows). Raises ClickException when the candidates' seeds differ."""
    seeds = {name: sorted(by_seed) for name, by_seed in candidates.items()}
    if len({tuple(v) for v in seeds.values()}) != 1:
        raise click.ClickException(f"candidates recorded at different seeds: {seeds}")
    order = sorted(candidates, key=lambda name: -np.mean([per_set(runs, "dilm").mean() for runs in candidates[name].values()]))
    leader = candidates[order[0]]
    head = ["candidate", *(f"DiLM seed {seed}" for seed in seeds[order[0]]), "DiLM over seeds", "p vs leader",
            *(f"{b} over seeds" for b in baselines), *(f"DiLM - {b}, p" for b in baselines)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in order:
        by_seed = candidates[name]
        means = [per_set(runs, "dilm").mean() for runs in by_seed.values()]
        strata = [(per_set(by_seed[seed], "dilm"), per_set(leader[seed], "dilm")) for seed in by_seed]
        p = "-" if name == order[0] else f"{stratified_permutation_p(strata):.3g}"
        cells = [name, *(f"{m:.1f}" for m in means), f"{np.mean(means):.1f}", p]
        cells += [f"{np.mean([per_set(runs, b).mean() for runs in by_seed.values()]):.1f}" for b in baselines]
        for b in baselines:
            found = comparison(by_seed, b)
            cells.append(f"{found['mean_difference']:+.1f}, {found['stratified_p']:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        f"Candidates ranked by DiLM's mean over seeds {', '.join(map(str, seeds[order[0]]))} (per-set means, %); p: stratified "
        "permutation test over the seeds (20,000 permutations).", "", *lines,
    ])


def recorded_command(fingerprint: dict, config_path: str) -> str:
    """The command that made the run: its config file and overrides as typed, which fingerprints
    hold from 2026-12-05 on; for an older fingerprint, ``config_path`` with the seed and the name
    (the only overrides it can tell)."""
    if "overrides" in fingerprint:
        return shlex.join(["dilm-ray", "run", fingerprint["config_file"] or config_path, *fingerprint["overrides"]])
    return f"dilm-ray run {config_path} seed={fingerprint['seed']}" + (f" name={fingerprint['config']}" if fingerprint["config"] != Path(config_path).stem else "")


@click.group()
def main() -> None:
    pass


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--into", type=click.Path(path_type=Path), default=RECORD, show_default=True)
@click.option("--config", "config_path", default="configs/sst2-cpu.yaml", show_default=True, help="the config the run was made from, for the recorded command of a fingerprint older than its own config file and overrides")
@click.option("--note", default="", help="what the record alone does not say (e.g. the commits earlier invocations of a resumed run ran)")
def record(run_dir: Path, into: Path, config_path: str, note: str) -> None:
    """Copy RUN_DIR's results into ``<into>/seed<N>/`` (N: the run's config seed)."""
    results = run_dir / "results"
    missing = [f for f in FILES if not (results / f).is_file()]
    if missing:
        raise click.ClickException(f"{results} lacks {', '.join(missing)}: run dilm-ray run to the end first")
    fingerprint = json.loads((results / FINGERPRINT_FILE).read_text())
    out = into / f"seed{fingerprint['seed']}"
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(results / name, out / name)
    meta = {
        "date": datetime.date.today().isoformat(), "commit": fingerprint["commit"], "cpu": fingerprint["machine"]["cpu"],
        "bf16_instructions": fingerprint["machine"]["bf16_instructions"], "precision": fingerprint["precision"],
        "command": recorded_command(fingerprint, config_path),
        **({"note": note} if note else {}),
    }
    (out / "record.json").write_text(json.dumps(meta, indent=1) + "\n")
    click.echo(f"recorded {run_dir} as {out}")


@main.command()
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=RECORD, show_default=True)
@click.option("--baseline", "baselines", multiple=True, default=("random", "k_centers"), show_default=True)
def report(root: Path, baselines: tuple[str, ...]) -> None:
    """The stratified comparison over every recorded seed; also written to ``<root>/summary.md``."""
    by_seed = seeds_recorded(root)
    if not by_seed:
        raise click.ClickException(f"no seed<N>/runs.csv under {root}")
    text = report_markdown(by_seed, baselines)
    (root / "summary.md").write_text(text + "\n")
    click.echo(text)


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--baseline", "baselines", multiple=True, default=("random", "k_centers"), show_default=True)
def choose(root: Path, baselines: tuple[str, ...]) -> None:
    """Rank the candidates under ROOT (``<candidate>/seed<N>/``, recorded on held-out train rows)
    by DiLM's mean over seeds; also written to ``<root>/choice.md``."""
    candidates = {folder.name: found for folder in sorted(root.iterdir()) if folder.is_dir() and (found := seeds_recorded(folder))}
    if not candidates:
        raise click.ClickException(f"no <candidate>/seed<N>/runs.csv under {root}")
    text = choice_markdown(candidates, baselines)
    (root / "choice.md").write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
