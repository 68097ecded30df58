"""Aggregating evaluation runs: mean, std, Welch's t-test against baselines, and a test
stratified by seed for experiments repeated at several seeds.

DiLM Sec. 4 reports the mean and std of the score over evaluation runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

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


def stratified_permutation_p(strata: Sequence[tuple[Sequence[float], Sequence[float]]], permutations: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value that ``a`` and ``b`` have equal means, stratified: one ``(a, b)`` pair
    per stratum (the main job: per-set mean scores of two methods at one seed).

    Statistic: the mean over strata of ``mean(a) - mean(b)``, so a shift that moves both methods
    at one seed (that seed's stage-1 generator, its split of rows) cancels. Its null
    distribution: the method labels permuted within each stratum, ``permutations`` times from a
    generator seeded with ``seed``; p = (1 + count of |permuted| >= |observed|) / (1 +
    permutations), in (0, 1]. NaN when a stratum has an empty side. Every value must be finite.
    """
    if not strata or any(len(a) == 0 or len(b) == 0 for a, b in strata):
        return float("nan")
    rng = np.random.default_rng(seed)
    pooled = [np.concatenate([np.asarray(a, float), np.asarray(b, float)]) for a, b in strata]
    sizes = [len(a) for a, _ in strata]

    def statistic(values: list[np.ndarray]) -> np.ndarray:  # values: [permutations, n] per stratum
        return np.mean([v[:, :k].mean(1) - v[:, k:].mean(1) for v, k in zip(values, sizes)], axis=0)

    observed = statistic([v[None] for v in pooled])[0]
    shuffled = [rng.permuted(np.broadcast_to(v, (permutations, len(v))), axis=1) for v in pooled]
    null = statistic(shuffled)
    return float((1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (1 + permutations))


def stratified_power(strata: Sequence[tuple[Sequence[float], Sequence[float]]], alpha: float = 0.05, target: float = 0.8) -> tuple[float, float]:
    """(power, sets) of the stratified comparison if the observed lead were the true one.

    ``strata`` as in ``stratified_permutation_p``. Normal approximation of the statistic (the
    mean over strata of ``mean(a) - mean(b)``) with each side's sample variance per stratum:
    ``se^2 = sum_s (var(a_s)/|a_s| + var(b_s)/|b_s|) / S^2``. ``power``: the chance of a
    two-sided p < ``alpha`` at these sizes; ``sets``: the sets per method per stratum at which
    that chance reaches ``target`` (inf for a zero lead). A post-hoc figure for planning, not a
    test: it takes the observed lead at face value. (NaN, NaN) when a side of a stratum has
    fewer than 2 values (no variance to plan with), as ``welch_p`` gives NaN.
    """
    from statistics import NormalDist

    if not strata or any(len(a) < 2 or len(b) < 2 for a, b in strata):
        return float("nan"), float("nan")
    n = NormalDist()
    lead = float(np.mean([np.mean(a) - np.mean(b) for a, b in strata]))
    var = sum(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b) for a, b in strata) / len(strata) ** 2
    z = n.inv_cdf(1 - alpha / 2)
    shift = abs(lead) / np.sqrt(var) if var > 0 else float("inf")
    power = n.cdf(shift - z) + n.cdf(-shift - z)
    # the same se with n sets on each side of every stratum: sum_s (var_a + var_b) / (S^2 n)
    spread = sum(np.var(a, ddof=1) + np.var(b, ddof=1) for a, b in strata) / len(strata) ** 2
    sets = (z + n.inv_cdf(target)) ** 2 * spread / lead**2 if lead else float("inf")
    return float(power), float(sets)
