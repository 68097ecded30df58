"""Load task splits through ``datasets``: from the hub (nyu-mll/glue) or a local folder/file.

Every problem a user can cause (missing file or column, empty split or text, a label outside
the label set) becomes one ``UserError`` naming the file and row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dilm_ray.config import Config, DataConfig
from dilm_ray.data.dataset import TextSet
from dilm_ray.data.tasks import TaskSpec, resolve_task
from dilm_ray.errors import UserError, first_line

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}


def find_split_file(folder: Path, split: str) -> Path:
    """``folder/split.parquet`` (or .csv/.jsonl/.json), also in the hub's ``data/split-*.parquet`` layout."""
    candidates = [folder / f"{split}{ext}" for ext in FORMATS]
    candidates += sorted(folder.glob(f"data/{split}-*.parquet")) + sorted(folder.glob(f"{split}-*.parquet"))
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"no '{split}' split in {folder}: expected {split}.parquet, {split}.csv or {split}.jsonl")


def _load_table(path: Path):
    import datasets

    datasets.disable_progress_bars()

    fmt = FORMATS.get(path.suffix)
    if fmt is None:
        raise UserError(f"{path}: unsupported file type '{path.suffix}' (use parquet, csv or jsonl)")
    if fmt == "parquet" and _parquet_rows(path) == 0:  # datasets cannot read an empty parquet file
        raise UserError(f"{path}: the split is empty")
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise UserError(f"{path}: {_no_rows(path, fmt) or f'cannot be read as {fmt}: {first_line(exc)}'}") from None


def _no_rows(path: Path, fmt: str) -> str | None:
    """Why ``path`` holds no rows (an empty or blank file, a CSV with only its header), or None.

    Asked only after ``datasets`` failed on the file, whose own messages for these cases are
    empty (an ``IndexError`` on their first line) or about its builder ("Instruction 'train'
    corresponds to no data!")."""
    if fmt == "parquet":
        return None
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    if not head.strip():
        return "the file is empty"
    if fmt == "json" and head.strip() == b"[]":
        return "the file holds no rows (an empty list)"
    if fmt == "csv":
        import pandas as pd

        try:
            return "the file has a header but no rows" if pd.read_csv(path, nrows=1).empty else None
        except Exception:
            return None
    return None


def _parquet_rows(path: Path) -> int | None:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None  # unreadable: let datasets report it


def _load_hub(task: TaskSpec, split: str):
    import datasets

    from dilm_ray.hub import go_offline_if_unreachable

    if task.hub_path is None:
        raise UserError(f"data.path is required for the custom task '{task.name}'")
    unreachable = go_offline_if_unreachable()
    try:
        return datasets.load_dataset(task.hub_path, task.hub_name, split=split)
    except Exception as exc:
        why = f"{unreachable}, and it is not in the local cache" if unreachable else first_line(exc)
        raise UserError(f"cannot load {task.hub_path}/{task.hub_name} split '{split}' from the hub ({why}); set data.path to a local folder") from None


def to_textset(table, task: TaskSpec, source: str) -> TextSet:
    """Check columns, text and labels of a ``datasets.Dataset`` and convert it."""
    missing = [c for c in (*task.text_columns, task.label_column) if c not in table.column_names]
    if missing:
        raise UserError(f"{source}: missing column '{missing[0]}' (columns: {', '.join(table.column_names)})")
    if len(table) == 0:
        raise UserError(f"{source}: the split is empty")
    columns = [table[c] for c in task.text_columns]
    texts = []
    for row, values in enumerate(zip(*columns)):
        for col, value in zip(task.text_columns, values):
            if value is None or not str(value).strip():
                raise UserError(f"{source} row {row}: empty text in column '{col}'")
        texts.append(tuple(str(v) for v in values))
    labels = _labels(list(table[task.label_column]), task, source)
    return TextSet(task.text_columns, tuple(texts), labels)


def _labels(raw: list, task: TaskSpec, source: str) -> np.ndarray:
    names = {n: i for i, n in enumerate(task.label_names)}
    out = np.empty(len(raw), dtype=np.int64)
    for row, value in enumerate(raw):
        if isinstance(value, str) and value in names:
            out[row] = names[value]
            continue
        try:
            label = int(value)
        except (TypeError, ValueError):
            label = -1
        if isinstance(value, float) and not float(value).is_integer():
            label = -1
        if not 0 <= label < task.num_labels:
            allowed = ", ".join(f"{i}/{n}" for i, n in enumerate(task.label_names))
            raise UserError(f"{source} row {row}: label {value!r} is outside the label set ({allowed})")
        out[row] = label
    return out


def load_split(cfg: DataConfig, task: TaskSpec, split: str) -> TextSet:
    """One split of the task, from ``cfg.path`` (folder or single file) or the hub."""
    if cfg.path is None:
        return to_textset(_load_hub(task, split), task, f"{task.hub_path}/{task.hub_name}:{split}")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise UserError(f"data.path {root} does not exist")
    path = root if root.is_file() else find_split_file(root, split)
    return to_textset(_load_table(path), task, str(path))


LABEL_ALIASES = ("labels",)  # what other tools call the label column (the DiLM authors' released sets)


def load_file(path: Path, task: TaskSpec, columns: dict[str, str] | None = None) -> TextSet:
    """A dataset file (parquet, csv, json, jsonl), e.g. someone else's distilled text.

    ``columns`` maps the task's column names to this file's (``{"label": "labels"}``); without
    a mapping for the label, a file without the task's label column but with ``labels`` uses
    that. Raises ``UserError`` naming the file for a missing file, column, text or a label
    outside the label set.
    """
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    table = _load_table(path)
    mapping = dict(columns or {})
    if task.label_column not in mapping and task.label_column not in table.column_names:
        alias = next((a for a in LABEL_ALIASES if a in table.column_names), None)
        if alias is not None:
            mapping[task.label_column] = alias
    for ours, theirs in mapping.items():
        if theirs not in table.column_names:
            raise UserError(f"{path}: --columns {ours}={theirs}: no column '{theirs}' (columns: {', '.join(table.column_names)})")
    for ours, theirs in mapping.items():
        if ours != theirs:
            table = table.rename_column(theirs, ours) if ours not in table.column_names else table.remove_columns(ours).rename_column(theirs, ours)
    return to_textset(table, task, str(path))


def subsample(data: TextSet, n: int | None, seed: int, balanced: bool, num_labels: int) -> TextSet:
    """Deterministic subset of ``n`` rows: the same (data, n, seed) always gives the same rows."""
    if n is None or n >= len(data):
        return data
    return data.select(subsample_indices(data, n, seed, balanced, num_labels))


def subsample_indices(data: TextSet, n: int | None, seed: int, balanced: bool, num_labels: int) -> np.ndarray:
    """The sorted row indices (int64) ``subsample`` keeps: all rows when ``n`` is None or too large;
    ``n // num_labels`` per label when ``balanced``."""
    if n is None or n >= len(data):
        return np.arange(len(data))
    rng = np.random.default_rng(seed)
    if not balanced:
        return np.sort(rng.choice(len(data), size=n, replace=False))
    per_label = [data.indices_of(y) for y in range(num_labels)]
    quota = n // num_labels
    chosen = [rng.choice(idx, size=min(quota, len(idx)), replace=False) for idx in per_label]
    return np.sort(np.concatenate(chosen))


@dataclass(frozen=True)
class TaskData:
    """A task with its (subsampled) train split and its validation split (empty when not needed)."""

    task: TaskSpec
    train: TextSet
    validation: TextSet


def load_data(cfg: Config, need_validation: bool = True) -> TaskData:
    """The config's task, train rows (``data.max_train_samples``, seeded) and validation rows.

    With ``data.dev_samples`` the rows reported on are a development split instead: that many
    train-split rows outside the train rows (drawn with ``data.seed + 1``), so settings can be
    chosen without looking at the validation split; the train rows are the same either way.

    Raises ``UserError`` for a missing folder, file, column, empty text or out-of-range label,
    and when fewer than ``data.dev_samples`` train-split rows are left outside the train rows.
    """
    task = resolve_task(cfg.data)
    d = cfg.data
    full = load_split(d, task, d.train_split)
    kept = subsample_indices(full, d.max_train_samples, d.seed, d.balanced, task.num_labels)
    train = full.select(kept) if len(kept) < len(full) else full
    if need_validation and d.dev_samples:
        rest = np.setdiff1d(np.arange(len(full)), kept)
        if len(rest) < d.dev_samples:
            raise UserError(f"data.dev_samples={d.dev_samples}: only {len(rest)} train rows are left outside data.max_train_samples={d.max_train_samples}")
        val = full.select(np.sort(np.random.default_rng(d.seed + 1).choice(rest, size=d.dev_samples, replace=False)))
    elif need_validation:
        val = load_split(d, task, task.validation_split)
        val = subsample(val, d.max_validation_samples, d.seed, False, task.num_labels)
    else:
        val = TextSet(task.text_columns, (), np.zeros(0))
    return TaskData(task, train, val)
