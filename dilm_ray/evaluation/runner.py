"""Evaluate groups of distilled sets: every set x several learner seeds, then a results table."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from dilm_ray.config import Config
from dilm_ray.data import TaskSpec, TextSet
from dilm_ray.evaluation.stats import summarize, welch_p
from dilm_ray.evaluation.train_eval import predict, scores, train_learner
from dilm_ray.models.learner import Learner, build_learner

Group = tuple[str, int]  # (method, dpc)


def run_plan(groups: dict[Group, list[TextSet]], runs_per_group: int, seed: int) -> list[tuple[Group, int, int]]:
    """(group, set index, learner seed) for every run; a group with fewer sets (herding: 1) cycles
    through them so that every group gets ``runs_per_group`` runs."""
    plan = []
    for group, sets in groups.items():
        for r in range(runs_per_group):
            plan.append((group, r % len(sets), seed + r))
    return plan


def evaluate_one(learner: Learner, train: TextSet, validation: TextSet, cfg: Config, task: TaskSpec, seed: int) -> dict[str, float]:
    start = time.perf_counter()
    train_learner(learner, train, cfg.evaluate, seed)
    out = scores(predict(learner, validation, cfg.evaluate.eval_batch_size), validation.labels, task.metric)
    out["seconds"] = time.perf_counter() - start
    return out


def evaluate_groups(cfg: Config, task: TaskSpec, validation: TextSet, groups: dict[Group, list[TextSet]], learner_name: str | None = None) -> pd.DataFrame:
    """One row per run: method, dpc, set, seed, learner and scores (sequential, in this process)."""
    learner = build_learner(cfg.learner, task.num_labels, cfg.seed, learner_name)
    rows = []
    plan = run_plan(groups, cfg.synthesize.n_datasets * cfg.evaluate.n_evals_per_dataset, cfg.seed)
    for (method, dpc), index, seed in tqdm(plan, desc="evaluate"):
        result = evaluate_one(learner, groups[(method, dpc)][index], validation, cfg, task, seed)
        rows.append({"method": method, "dpc": dpc, "set": index, "seed": seed, "learner": learner_name or cfg.learner.model, **result})
    return pd.DataFrame(rows)


def results_table(runs: pd.DataFrame, reference: str = "dilm") -> pd.DataFrame:
    """Mean, std and run count of the score per (learner, dpc, method), with Welch p-values of
    ``reference`` against every other method at the same dpc and learner."""
    rows = []
    for (learner, dpc), cell in runs.groupby(["learner", "dpc"], sort=True):
        ref = cell.loc[cell.method == reference, "score"].tolist()
        for method, part in cell.groupby("method", sort=True):
            row = {"learner": learner, "dpc": dpc, "method": method, **summarize(part["score"].tolist())}
            row["mean_seconds"] = float(part["seconds"].mean())
            row[f"p_vs_{reference}"] = welch_p(ref, part["score"].tolist()) if method != reference and ref else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| learner | DPC | method | accuracy (mean ± std, %) | runs | p vs dilm |", "|---|---|---|---|---|---|"]
    p_col = next((c for c in table.columns if c.startswith("p_vs_")), None)
    for r in table.itertuples(index=False):
        p = getattr(r, p_col) if p_col else float("nan")
        lines.append(
            f"| {r.learner} | {r.dpc} | {r.method} | {100 * r.mean:.1f} ± {100 * r.std:.1f} | {r.runs} | {'' if p != p else f'{p:.3g}'} |"
        )
    return "\n".join(lines)


def write_results(runs: pd.DataFrame, table: pd.DataFrame, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "runs.csv", out_dir / "table.csv", out_dir / "table.md"]
    runs.to_csv(paths[0], index=False)
    table.to_csv(paths[1], index=False)
    paths[2].write_text(to_markdown(table) + "\n")
    return paths
