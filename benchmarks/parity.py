"""Do two benchmark records agree? Per-set means of each method, compared across two ``runs.csv``.

Made for the precision question (is a bf16 benchmark as good as the recorded fp32 one?), usable
for any two records of the same task, learner and DPC. Each distilled set gives one value (the
mean over its learner seeds), so extra seeds cannot buy a narrower interval; the interval of the
difference of means uses Welch's degrees of freedom (``dilm_ray.evaluation.stats.welch_ci``).
Rows whose set digest equals on both sides (the same real rows: random coresets) are also
compared run by run, which isolates the evaluator's own precision effect.

    python benchmarks/parity.py benchmarks/results/sst2-bench/bench-cpu-dpc10/runs.csv \
        benchmarks/results/sst2-bench-bf16/bench-cpu-dpc10/runs.csv --learner minilm-l6 --dpc 10
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import pandas as pd

from dilm_ray.evaluation.stats import welch_ci, welch_p


def per_set(runs: pd.DataFrame, learner: str, dpc: int) -> dict[str, pd.Series]:
    """method -> the mean score (%) of each distilled set (index: set_index)."""
    cell = runs[(runs.learner == learner) & (runs.dpc == dpc)]
    return {m: 100 * part.groupby("set_index")["score"].mean() for m, part in cell.groupby("method")}


@click.command()
@click.argument("first", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("second", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--learner", default="minilm-l6", show_default=True)
@click.option("--dpc", default=10, show_default=True)
@click.option("--level", default=0.95, show_default=True, help="confidence level of the interval")
def main(first: Path, second: Path, learner: str, dpc: int, level: float) -> None:
    a_runs, b_runs = (pd.read_csv(p, dtype={"set_digest": str}) for p in (first, second))
    a, b = per_set(a_runs, learner, dpc), per_set(b_runs, learner, dpc)
    print(f"A = {first}\nB = {second}\n{learner}, DPC {dpc}: per-set means (%), one value per distilled set\n")
    print(f"| method | A mean ± std (sets) | B mean ± std (sets) | B - A | {100 * level:.0f}% CI of B - A | Welch p |")
    print("|---|---|---|---|---|---|")
    for method in sorted(set(a) & set(b)):
        x, y = a[method].to_numpy(), b[method].to_numpy()
        ci = welch_ci(list(y), list(x), level) if len(x) > 1 and len(y) > 1 else (np.nan, np.nan)
        print(f"| {method} | {x.mean():.1f} ± {x.std(ddof=1):.1f} ({len(x)}) | {y.mean():.1f} ± {y.std(ddof=1):.1f} ({len(y)}) | "
              f"{y.mean() - x.mean():+.1f} | [{ci[0]:+.1f}, {ci[1]:+.1f}] | {welch_p(list(y), list(x)):.3g} |")
    keys = ["method", "set_index", "seed", "set_digest"]
    cell = lambda r: r[(r.learner == learner) & (r.dpc == dpc)][[*keys, "score"]]  # noqa: E731
    same = cell(a_runs).merge(cell(b_runs), on=keys, suffixes=("_a", "_b"))
    for method, part in same.groupby("method"):
        diff = 100 * (part.score_b - part.score_a)
        print(f"\nsame set and seed on both sides, {method}: {len(part)} runs, B - A = {diff.mean():+.2f} points on average "
              f"(range {diff.min():+.1f} to {diff.max():+.1f})")


if __name__ == "__main__":
    main()
