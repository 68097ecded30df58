"""Evaluate groups of distilled sets: learners x sets x seeds, sequentially or as Ray tasks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from dilm_ray.config import Config
from dilm_ray.data import TaskSpec, TextSet
from dilm_ray.evaluation.learners import describe, evaluate_learner
from dilm_ray.evaluation.stats import summarize, welch_p

Group = tuple[str, int]  # (method, dpc)


@dataclass(frozen=True)
class Run:
    learner: str
    method: str
    dpc: int
    set_index: int
    seed: int


def run_plan(groups: dict[Group, list], runs_per_group: int, seed: int, learners: list[str]) -> list[Run]:
    """Every run; a group with fewer sets (herding: 1) cycles through them so that every group
    gets ``runs_per_group`` runs with the same seeds. Groups take turns, so an interrupted
    evaluation leaves every method with about as many runs."""
    return [
        Run(learner, method, dpc, r % len(sets), seed + r)
        for learner in learners
        for r in range(runs_per_group)
        for (method, dpc), sets in groups.items()
    ]


def run_one(cfg: Config, task: TaskSpec, validation: TextSet, train: TextSet, run: Run, cache: dict | None = None) -> dict:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result = evaluate_learner(run.learner, train, validation, cfg, task, run.seed, cache)
    return {**run.__dict__, "family": describe(run.learner), **result}


def evaluate_groups(cfg: Config, task: TaskSpec, validation: TextSet, groups: dict[Group, list[TextSet]], learners: list[str] | None = None, parallel: bool | None = None) -> pd.DataFrame:
    """One row per run (learner, method, dpc, set, seed, scores, seconds)."""
    learners = learners or cfg.evaluate.learners or [cfg.learner.model]
    plan = run_plan(groups, cfg.synthesize.n_datasets * cfg.evaluate.n_evals_per_dataset, cfg.seed, learners)
    return evaluate_plan(cfg, task, validation, groups, plan, parallel)


def evaluate_plan(
    cfg: Config,
    task: TaskSpec,
    validation: TextSet,
    groups: dict[Group, list[TextSet]],
    plan: list[Run],
    parallel: bool | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> pd.DataFrame:
    """The runs of ``plan``, as Ray tasks (``cfg.evaluate.parallel``) or one after another.
    ``on_row`` sees each run's row as soon as it finishes (to save progress)."""
    if cfg.evaluate.parallel if parallel is None else parallel:
        from dilm_ray.evaluation.parallel import run_parallel

        rows = run_parallel(cfg, task, validation, groups, plan, on_row)
    else:
        cache: dict = {}
        rows = []
        for r in tqdm(plan, desc="evaluate"):
            rows.append(run_one(cfg, task, validation, groups[(r.method, r.dpc)][r.set_index], r, cache))
            if on_row is not None:
                on_row(rows[-1])
    return pd.DataFrame(rows)


def results_table(runs: pd.DataFrame, references: tuple[str, ...] = ("dilm",)) -> pd.DataFrame:
    """Mean, std and run count of the score per (learner, dpc, method), with a Welch p-value
    column ``p_vs_<ref>`` per reference method (against every other method at that dpc and learner)."""
    rows = []
    for (learner, dpc), cell in runs.groupby(["learner", "dpc"], sort=True):
        refs = {ref: cell.loc[cell.method == ref, "score"].tolist() for ref in references}
        for method, part in cell.groupby("method", sort=True):
            scores = part["score"].tolist()
            row = {"learner": learner, "dpc": dpc, "method": method, **summarize(scores)}
            row["mean_seconds"] = float(part["seconds"].mean())
            for ref, ref_scores in refs.items():
                row[f"p_vs_{ref}"] = welch_p(ref_scores, scores) if method != ref and ref_scores else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, score_name: str) -> str:
    """``score_name`` (``TaskSpec.score_name``) heads the score column; no default, as QQP's score is not accuracy."""
    p_cols = [c for c in table.columns if c.startswith("p_vs_")]
    lines = [f"| learner | DPC | method | {score_name} (mean ± std, %) | runs |" + "".join(f" p vs {c[5:]} |" for c in p_cols),
             "|---|---|---|---|---|" + "---|" * len(p_cols)]
    for r in table.to_dict("records"):
        name = Path(r["learner"]).name if Path(r["learner"]).exists() else r["learner"]
        ps = "".join(f" {'' if r[c] != r[c] else f'{r[c]:.3g}'} |" for c in p_cols)
        lines.append(f"| {name} | {r['dpc']} | {r['method']} | {100 * r['mean']:.1f} ± {100 * r['std']:.1f} | {r['runs']} |{ps}")
    return "\n".join(lines)


def write_results(runs: pd.DataFrame, table: pd.DataFrame, out_dir: Path, score_name: str) -> list[Path]:
    """runs.csv, table.csv, table.md and accuracy_vs_dpc.png."""
    from dilm_ray.evaluation.plots import accuracy_vs_dpc

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "runs.csv", out_dir / "table.csv", out_dir / "table.md"]
    runs.to_csv(paths[0], index=False)
    table.to_csv(paths[1], index=False)
    paths[2].write_text(to_markdown(table, score_name) + "\n")
    paths.append(accuracy_vs_dpc(table, out_dir / "accuracy_vs_dpc.png", score_name))
    return paths
