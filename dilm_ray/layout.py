"""Every folder and file of a run, named once.

``<output_dir>/<name>/`` (``RunLayout(cfg.run_dir)``):

| path | what |
|---|---|
| ``generator-lm/`` | stage 1: the LM-only generator (a ``from_pretrained`` folder, ``train_state.pt``, ``stage.json``) |
| ``generator-dilm/`` | stage 2: the DiLM generator |
| ``distilled/<method>/dpc<D>/set<i>/train.{jsonl,parquet}`` | stage 3 and the coresets: one distilled set (coresets also ``rows.jsonl``, generated sets ``pool.jsonl``) |
| ``distilled/<method>/preview.md`` | a few samples per label of set 0 |
| ``results/`` | ``runs.csv`` (one row per evaluation run), ``table.{csv,md}``, plots |
| ``cache/`` | train-row embeddings shared by stage 2 and the coresets |
| ``ray/`` | Ray Train checkpoints of stages 1-2 (``ray.storage_path`` moves them) |
| ``tune/`` | ``dilm-ray tune``: trials, ``ranking.csv``, ``best.yaml``, ``best-distilled/`` |
| ``timing.json`` | wall time and invocations per stage, summed over resumed invocations |
| ``logs/<stage>-rank<r>.log`` | what each Ray Train worker of stages 1-2 printed (the terminal shows one bar per stage) |
| ``mlflow-runs.json`` | the MLflow run of each command, reopened by ``--resume`` |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SET_FILES = ("train.jsonl", "train.parquet")  # what a set folder may hold, preferred first
ROWS_FILE = "rows.jsonl"  # a coreset's rows as indices into the loaded train split, one {"row": i} per line
POOL_FILE = "pool.jsonl"  # a generated set's over-sampled pool, the rows its set was selected from


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def generator_lm(self) -> Path:
        return self.root / "generator-lm"

    @property
    def generator_dilm(self) -> Path:
        return self.root / "generator-dilm"

    def generator(self, stage: str) -> Path:
        """The checkpoint folder of ``stage`` (``pretrain`` or ``distill``)."""
        return {"pretrain": self.generator_lm, "distill": self.generator_dilm}[stage]

    @property
    def distilled(self) -> Path:
        return self.root / "distilled"

    def method_dir(self, method: str) -> Path:
        return self.distilled / method

    def set_dir(self, method: str, dpc: int, index: int) -> Path:
        return self.distilled / method / f"dpc{dpc}" / f"set{index}"

    def set_data(self, method: str, dpc: int, index: int) -> Path:
        """The set's data file as this project writes it (``train.jsonl``; ``train.parquet`` beside it)."""
        return self.set_dir(method, dpc, index) / SET_FILES[0]

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def runs_csv(self) -> Path:
        return self.results / "runs.csv"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    def worker_log(self, stage: str, rank: int) -> Path:
        """Where the Ray Train worker of ``rank`` writes its output in ``stage`` (appended to on resume)."""
        return self.root / "logs" / f"{stage}-rank{rank}.log"

    @property
    def timing(self) -> Path:
        return self.root / "timing.json"

    @property
    def mlflow_runs(self) -> Path:
        return self.root / "mlflow-runs.json"


def find_set_file(folder: Path) -> Path | None:
    for name in SET_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def discover_sets(root: Path) -> dict[tuple[str, int], list[Path]]:
    """``<root>/<method>/dpc<D>/set<i>/train.{jsonl,parquet}`` grouped by (method, DPC), sets in index order."""
    found: dict[tuple[str, int], list[tuple[int, Path]]] = {}
    for folder in root.glob("*/dpc*/set*"):
        path = find_set_file(folder)
        dpc, index = folder.parent.name.removeprefix("dpc"), folder.name.removeprefix("set")
        if path is None or not dpc.isdigit() or not index.isdigit():
            continue
        found.setdefault((folder.parents[1].name, int(dpc)), []).append((int(index), path))
    return {group: [p for _, p in sorted(sets)] for group, sets in sorted(found.items())}


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
NOT_SETS = (ROWS_FILE, POOL_FILE, "stage.json")  # files in set folders that are not sets


def discover_data_files(root: Path) -> dict[str, list[Path]]:
    """Every data file under ``root`` (parquet, csv, json, jsonl), grouped by folder: the group
    is the folder's path relative to ``root`` (``.`` for files directly in it), so folders of
    the same name in different places (the DiLM authors' ``dpc_<D>.<run>/dataset/``) stay apart.
    A folder holding one set in two formats (``train.jsonl`` and ``train.parquet``) counts once,
    as its preferred file. Files are sorted by name, numbers in names compared as numbers."""
    import re

    def natural(path: Path) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]

    groups: dict[str, list[Path]] = {}
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in DATA_SUFFIXES and not path.name.startswith(".") and path.name not in NOT_SETS:
            if path.name == "train.parquet" and (path.parent / "train.jsonl").is_file():
                continue
            groups.setdefault(str(path.parent.relative_to(root)), []).append(path)
    return {group: sorted(paths, key=natural) for group, paths in sorted(groups.items())}
