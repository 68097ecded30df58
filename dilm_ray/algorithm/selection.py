"""Picking representative points from embeddings: K-means, K-centers (K-means medoids), herding, random.

K-means builds DiLM's representative teacher sets and clusters the synthetic pool (Sec. 3.2);
K-centers selects each distilled set from the over-sampled generations (Sec. 3.3); K-centers,
herding and random are also the coreset baselines (Sec. 4). Index outputs are int64 row indices
into ``x``. Seeded functions draw from a private CPU ``torch.Generator``: pass CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's K-means with k-means++ seeding. Returns (centers [k, d], assignment [n]).

    Our own rather than scikit-learn's ``KMeans`` for now, although the measurement favours the
    library (``benchmarks/kmeans.py``, benchmarks/README.md "K-means"): on one thread it is
    1.2-2.2x faster at every shape used here, lands at a 0.4-2.2% lower inertia in 46 of 50
    runs, and converges where this one stops at its 50 steps on a label's 10,000 train rows.
    Switching moves every K-centers coreset (57% of rows shared on SST-2, DPC 10) and every DiLM
    set and stage-2 run, hence every published number; it is to be made with the re-made records
    of the main-job work, not silently under today's.

    ``x``: float [n, d] on CPU, computed in float32. Centers are float32 [k, d] (an empty
    cluster keeps its previous center); the assignment is int64 [n] in [0, k). Stops at
    convergence or after ``iters`` Lloyd steps; deterministic given ``seed``.
    Raises ValueError unless 1 <= k <= n.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= n, got k={k}, n={n}")
    rng = torch.Generator().manual_seed(seed)
    x = x.float()
    centers = x[torch.randint(n, (1,), generator=rng)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centers).min(1).values.pow(2)
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        centers = torch.cat([centers, x[torch.multinomial(probs, 1, generator=rng)]])
    assign = torch.cdist(x, centers).argmin(1)
    for _ in range(iters):
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centers[j] for j in range(k)])
        new_assign = torch.cdist(x, new).argmin(1)
        centers = new
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return centers, assign


def nearest_to_centers(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """For each center, the index of the closest point, distinct across centers.

    ``x``: float [n, d]; ``centers``: float [k, d]. Returns int64 [k]: greedy in center order,
    a center whose nearest point is taken gets its next nearest. Needs k <= n (else the search
    runs out of points and raises StopIteration).
    """
    d = torch.cdist(centers.float(), x.float())
    chosen: list[int] = []
    for row in d:
        order = row.argsort()
        chosen.append(next(int(i) for i in order if int(i) not in chosen))
    return torch.tensor(chosen, dtype=torch.long)


def k_centers(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """K-centers as DiLM's reference code defines it: the point nearest each of ``k`` K-means
    centroids. Representative points, unlike the greedy farthest-first traversal, which picks
    outliers (one-word fragments, in text embeddings).

    ``x``: float [n, d] (CPU). Returns int64 [k], distinct. DiLM Sec. 3.3 (selecting DPC
    generated samples per class) and the K-centers coreset baseline (Sec. 4).
    Raises ValueError unless 1 <= k <= n."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k_centers needs 1 <= k <= n, got k={k}, n={n}")
    centers, _ = kmeans(x, k, seed)
    return nearest_to_centers(x, centers)


def herding(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy herding (Welling 2009): each pick keeps the running mean closest to the data mean.

    ``x``: float [n, d], computed in float32. Returns int64 [k], distinct, in pick order
    (deterministic: no seed). The herding coreset baseline (DiLM Sec. 4).
    Raises ValueError unless 1 <= k <= n.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"herding needs 1 <= k <= n, got k={k}, n={n}")
    x = x.float()
    mu = x.mean(0)
    total = torch.zeros_like(mu)
    available = torch.ones(n, dtype=torch.bool)
    chosen: list[int] = []
    for t in range(1, k + 1):
        gap = ((total + x) / t - mu).norm(dim=1).masked_fill(~available, float("inf"))
        pick = int(gap.argmin())
        chosen.append(pick)
        available[pick] = False
        total += x[pick]
    return torch.tensor(chosen, dtype=torch.long)


def random_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct indices drawn uniformly from range(n) with ``seed``: int64 [k].

    The random coreset baseline (DiLM Sec. 4). Raises ValueError unless 1 <= k <= n.
    """
    if not 1 <= k <= n:
        raise ValueError(f"random_subset needs 1 <= k <= n, got k={k}, n={n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def consistent_mask(labels: torch.Tensor, proba: torch.Tensor) -> torch.Tensor:
    """Bool [n]: row i's reference label ``argmax(proba[i])`` is ``labels[i]``, the label it was
    generated for (``labels``: int64 [n]; ``proba``: float [n, num_labels])."""
    return proba.argmax(1) == labels


def label_consistent(labels: torch.Tensor, proba: torch.Tensor, min_per_label: int) -> torch.Tensor:
    """Rows whose reference label is the label they were generated for (a label-consistency
    filter, beyond the paper: DiLM Sec. 3.3 selects from the whole pool).

    ``labels``: int64 [n], the label each row was generated for; ``proba``: float [n, num_labels],
    a reference classifier's class probabilities of each row. Keeps row i when
    ``argmax(proba[i]) == labels[i]``. A label left with fewer than ``min_per_label`` such rows is
    topped up with its other rows in descending ``proba[i, label]`` (the rows the reference finds
    least wrong), so every label still has ``min(min_per_label, rows)`` rows to select from.
    Returns sorted int64 row indices. Raises ValueError when the shapes disagree.
    """
    if proba.ndim != 2 or labels.shape != proba.shape[:1]:
        raise ValueError(f"label_consistent needs labels [n] and proba [n, L], got {tuple(labels.shape)} and {tuple(proba.shape)}")
    consistent = consistent_mask(labels, proba)
    keep = [consistent.nonzero().flatten()]
    for label in labels.unique().tolist():
        rows = (labels == label).nonzero().flatten()
        short = min(min_per_label, len(rows)) - int(consistent[rows].sum())
        if short > 0:
            others = rows[~consistent[rows]]
            keep.append(others[proba[others, label].argsort(descending=True, stable=True)[:short]])
    return torch.cat(keep).sort().values


LabelFilter = Callable[[torch.Tensor], torch.Tensor]  # learner embeddings [n, hidden] -> class probabilities [n, labels]


def embedding_classifier(embeddings: torch.Tensor, labels: np.ndarray, seed: int, c: float = 0.1) -> LabelFilter:
    """The reference classifier of the label-consistency filter: logistic regression
    (scikit-learn) on the learner's frozen embeddings of the real train rows.

    ``embeddings``: float [n, hidden] (``train_embeddings``); ``labels``: int [n]; ``c``: inverse
    L2 strength (chosen on held-out QQP train rows, ``benchmarks/label_filter.py``).
    Returns ``proba(embeddings [m, hidden]) -> float32 [m, num_labels]``. Features are
    standardised first (pooled embeddings are not unit-scale). It is another model family than the TF-IDF
    classifier that measures label fidelity (``evaluation.fidelity``), so the filter cannot
    grade its own work, and it costs nothing extra: stage 2 and the K-centers coresets cache
    the same embeddings. Used at synthesis (``synthesis.synthesize``) and, with
    ``distill.label_filter``, on stage 2's generated pools (``train.distill``). Raises ValueError (scikit-learn) when ``labels`` has one class.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=c, random_state=seed))
    clf.fit(embeddings.float().numpy(), np.asarray(labels))
    return lambda x: torch.from_numpy(clf.predict_proba(x.float().numpy())).float()


def select_per_class(embeddings: torch.Tensor, labels: np.ndarray, dpc: int, method: str, seed: int) -> np.ndarray:
    """Indices (int64, shape [<= dpc x labels], label by label) of ``dpc`` rows per label chosen
    by ``method`` on ``embeddings`` (float [n, d]): ``random`` (seeded), ``k_centers`` (the row
    nearest each K-means centroid, DiLM's reference ``src/coreset/k_centers.py``) or ``herding``.
    A label with fewer rows keeps all of them. Raises ``ValueError`` for an unknown method."""
    chosen = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        k = min(dpc, len(idx))
        if method == "random":
            pick = random_subset(len(idx), k, seed + int(label))
        elif method == "k_centers":
            pick = k_centers(embeddings[idx], k, seed + int(label))
        elif method == "herding":
            pick = herding(embeddings[idx], k)
        else:
            raise ValueError(f"unknown selection method {method!r}")
        chosen.append(idx[pick.numpy()])
    return np.concatenate(chosen)
