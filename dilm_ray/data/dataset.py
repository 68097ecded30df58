"""An in-memory labelled text set: the unit every stage reads and writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class TextSet:
    """Rows of 1 or 2 text fields with integer labels, in the task's own column names."""

    columns: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...]
    labels: np.ndarray  # int64, shape [n]

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, indices: Sequence[int] | np.ndarray) -> TextSet:
        idx = np.asarray(indices, dtype=np.int64)
        return TextSet(self.columns, tuple(self.texts[i] for i in idx), self.labels[idx])

    def indices_of(self, label: int) -> np.ndarray:
        return np.flatnonzero(self.labels == label)

    def counts(self, num_labels: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_labels).tolist()

    @staticmethod
    def concat(parts: Sequence[TextSet]) -> TextSet:
        columns = parts[0].columns
        texts = tuple(t for p in parts for t in p.texts)
        return TextSet(columns, texts, np.concatenate([p.labels for p in parts]) if parts else np.zeros(0))

    def digest(self) -> str:
        """SHA-256 of the rows (text fields and labels, in order): the set's identity in cache keys."""
        from dilm_ray.keys import texts_digest

        return texts_digest(self.texts, self.labels)

    def to_records(self) -> list[dict]:
        return [dict(zip(self.columns, t), label=int(y)) for t, y in zip(self.texts, self.labels)]

    def save(self, directory: Path, name: str = "train") -> list[Path]:
        """Write ``name.parquet`` and ``name.jsonl``: an ordinary dataset ``datasets`` can load."""
        import datasets

        directory.mkdir(parents=True, exist_ok=True)
        table = {c: [t[i] for t in self.texts] for i, c in enumerate(self.columns)}
        table["label"] = self.labels.tolist()
        ds = datasets.Dataset.from_dict(table)
        parquet, jsonl = directory / f"{name}.parquet", directory / f"{name}.jsonl"
        ds.to_parquet(str(parquet))
        ds.to_json(str(jsonl), lines=True, force_ascii=False)
        return [parquet, jsonl]
