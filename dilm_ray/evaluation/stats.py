"""Aggregating evaluation runs: mean, std and Welch's t-test against baselines.

DiLM Sec. 4 reports the mean and std of the score over evaluation runs.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def summarize(values: list[float]) -> dict[str, float]:
    """``mean``, sample ``std`` (ddof=1; 0.0 for one run) and ``runs`` (count) of ``values``.

    Units are those of ``values`` (scores: fractions). An empty list gives a NaN mean (numpy warns).
    """
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "runs": len(arr)}


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided Welch's t-test p-value; NaN when either side has fewer than 2 runs or no variance.

    "No variance": both sides constant. A p-value in [0, 1].
    """
    if len(a) < 2 or len(b) < 2 or (np.var(a) == 0 and np.var(b) == 0):
        return float("nan")
    with warnings.catch_warnings():  # scipy's "precision loss" on nearly equal runs: nothing for a user to do
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def welch_ci(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of mean(a) - mean(b) with Welch's degrees of freedom (scipy's
    ``ttest_ind(..., equal_var=False).confidence_interval``), in the units of the values.

    Raises ValueError when either side has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a confidence interval needs 2+ values per side, got {len(a)} and {len(b)}")
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence_level=level)
    return float(ci.low), float(ci.high)
