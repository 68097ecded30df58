"""Reporting: evaluation rows into tables (mean, std, Welch p-values), markdown, CSV and plots.

The tables of DiLM Sec. 4: mean and std of the score over evaluation runs per method and DPC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from dilm_ray.evaluation.fidelity import Fidelity
from dilm_ray.evaluation.stats import summarize, welch_p


def results_table(runs: pd.DataFrame, references: Sequence[str] = ("dilm",), fidelity: Mapping[tuple[str, int], Fidelity] | None = None) -> pd.DataFrame:
    """Mean, std and run count of the score per (learner, dpc, method), with a Welch p-value
    column ``p_vs_<ref>`` per reference method (against every other method at that dpc and
    learner; NaN where the reference has no runs or either side has fewer than 2).

    ``runs``: one row per evaluation run with columns learner, dpc, method, score (a fraction),
    seconds. Scores stay fractions here; ``to_markdown`` prints percent.

    ``fidelity``: (method, dpc) -> the label fidelity of that group's sets (``evaluation.fidelity``).

    Output columns: learner, dpc, method, mean, std, runs, mean_seconds (seconds per run),
    p_vs_<ref>..., and with ``fidelity`` label_fidelity (a fraction; NaN for groups without one,
    such as coresets) and label_fidelity_text (percent overall and per label); rows sorted by
    (learner, dpc, method). pandas raises KeyError when ``runs``
    lacks one of those input columns."""
    rows = []
    for (learner, dpc), cell in runs.groupby(["learner", "dpc"], sort=True):
        refs = {ref: cell.loc[cell.method == ref, "score"].tolist() for ref in references}
        for method, part in cell.groupby("method", sort=True):
            scores = part["score"].tolist()
            row = {"learner": learner, "dpc": dpc, "method": method, **summarize(scores)}
            row["mean_seconds"] = float(part["seconds"].mean())
            for ref, ref_scores in refs.items():
                row[f"p_vs_{ref}"] = welch_p(ref_scores, scores) if method != ref and ref_scores else float("nan")
            if fidelity is not None:
                found = fidelity.get((method, int(dpc)))
                row["label_fidelity"] = found.overall if found else float("nan")
                row["label_fidelity_text"] = found.text() if found else ""
            rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, score_name: str) -> str:
    """``score_name`` (``TaskSpec.score_name``) heads the score column; no default, as QQP's score is not accuracy.

    ``table``: a ``results_table``. One markdown row per table row: mean ± std in percent (one
    decimal), the run count, p-values to 3 significant digits (blank when NaN), and the label
    fidelity when the table has it (blank for coresets). Local learner paths are shortened to
    their last component.
    """
    p_cols = [c for c in table.columns if c.startswith("p_vs_")]
    fid = "label_fidelity_text" in table.columns
    lines = [f"| learner | DPC | method | {score_name} (mean ± std, %) | runs |" + "".join(f" p vs {c[5:]} |" for c in p_cols)
             + (" label fidelity % (per label) |" if fid else ""),
             "|---|---|---|---|---|" + "---|" * (len(p_cols) + fid)]
    for r in table.to_dict("records"):
        name = Path(r["learner"]).name if Path(r["learner"]).exists() else r["learner"]
        ps = "".join(f" {'' if r[c] != r[c] else f'{r[c]:.3g}'} |" for c in p_cols)
        fs = f" {r['label_fidelity_text'] if isinstance(r['label_fidelity_text'], str) else ''} |" if fid else ""
        lines.append(f"| {name} | {r['dpc']} | {r['method']} | {100 * r['mean']:.1f} ± {100 * r['std']:.1f} | {r['runs']} |{ps}{fs}")
    return "\n".join(lines)


def write_results(runs: pd.DataFrame, table: pd.DataFrame, out_dir: Path, score_name: str) -> list[Path]:
    """runs.csv, table.csv, table.md and accuracy_vs_dpc.png.

    Written to ``out_dir`` (created if missing); returns their paths in that order. Raises
    ValueError (from the plot) when ``table`` is empty.
    """
    from dilm_ray.evaluation.plots import accuracy_vs_dpc

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "runs.csv", out_dir / "table.csv", out_dir / "table.md"]
    runs.to_csv(paths[0], index=False)
    table.to_csv(paths[1], index=False)
    paths[2].write_text(to_markdown(table, score_name) + "\n")
    paths.append(accuracy_vs_dpc(table, out_dir / "accuracy_vs_dpc.png", score_name))
    return paths
