"""Label fidelity: does generated text belong to the label it was generated for?

A reference classifier trained on the real train rows (word 1-2 gram TF-IDF + logistic
regression: seconds to fit, no GPU, and a different model family from every learner the sets
are scored with) labels each generated row; the label fidelity of a set is the share of its
rows whose reference label is the label they were generated for. It explains scores: a set
whose rows do not follow their labels teaches any learner the wrong boundary. Read it against
the reference classifier's own accuracy on real validation rows (``reference_accuracy``).

Rows picked from the real train split (random, K-centers, herding coresets, the full-data row) are not measured:
the reference classifier was fitted on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dilm_ray.data.dataset import TextSet
from dilm_ray.evaluation.job import FULL_DATA
from dilm_ray.methods import CORESETS

REAL_ROW_METHODS = (*CORESETS, FULL_DATA)  # rows of the train split itself

Predict = Callable[[TextSet], np.ndarray]


def reference_classifier(train: TextSet, seed: int = 0) -> Predict:
    """TF-IDF (word 1-2 grams, sublinear tf) + logistic regression fitted on ``train``.

    Returns ``predict(TextSet) -> int64 [n]`` labels; pair rows are read as the TF-IDF learner
    reads them (``joined_texts``: ``a [SEP] b``, the vectorizer sees the word "sep" between the
    texts). Raises ValueError (scikit-learn) when ``train`` has one label only.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from dilm_ray.evaluation.learners import joined_texts

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    clf = LogisticRegression(max_iter=1000, random_state=seed).fit(vectorizer.fit_transform(joined_texts(train)), train.labels)
    return lambda data: clf.predict(vectorizer.transform(joined_texts(data))).astype(np.int64) if len(data) else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Fidelity:
    """``overall``: share of rows whose reference label is their label, in [0, 1];
    ``by_label``: the same per label (NaN for a label without rows); ``rows``: rows measured."""

    overall: float
    by_label: tuple[float, ...]
    rows: int

    def text(self) -> str:
        """``78.0 (81.2/74.8)``: percent overall, then per label."""
        per = "/".join("-" if v != v else f"{100 * v:.0f}" for v in self.by_label)
        return f"{100 * self.overall:.1f} ({per})"


def label_fidelity(predict: Predict, sets: Sequence[TextSet], num_labels: int) -> Fidelity:
    """The fidelity of the rows of ``sets`` together (every row weighs the same).

    Raises ValueError when the sets hold no rows."""
    labels = np.concatenate([np.asarray(s.labels, dtype=np.int64) for s in sets]) if sets else np.zeros(0, np.int64)
    if not len(labels):
        raise ValueError("label fidelity of no rows")
    hits = np.concatenate([predict(s) == np.asarray(s.labels) for s in sets])
    by_label = tuple(float(hits[labels == y].mean()) if (labels == y).any() else float("nan") for y in range(num_labels))
    return Fidelity(float(hits.mean()), by_label, int(len(labels)))


def measured(group: tuple[str, int], sets: Sequence[TextSet]) -> bool:
    """Whether ``group_fidelity`` measures a group: generated (not a coreset) and not empty."""
    return group[0] not in REAL_ROW_METHODS and sum(len(s) for s in sets) > 0


def group_fidelity(predict: Predict, groups: Mapping[tuple[str, int], Sequence[TextSet]], num_labels: int) -> dict[tuple[str, int], Fidelity]:
    """``label_fidelity`` per (method, dpc) group of generated sets; coresets and empty groups are left out."""
    return {
        group: label_fidelity(predict, sets, num_labels)
        for group, sets in groups.items()
        if measured(group, sets)
    }


def reference_accuracy(predict: Predict, validation: TextSet) -> float:
    """The reference classifier's accuracy on real rows (the ceiling fidelity is read against)."""
    return float((predict(validation) == np.asarray(validation.labels)).mean())
