"""Dataset cards: each distilled set folder is a dataset others can load and read.

``README.md`` with the Hugging Face card's YAML header: ``configs`` points ``load_dataset`` at
``train.jsonl`` (so ``datasets.load_dataset(folder)`` loads the set even beside its parquet
twin), ``dataset_info`` gives the label names as a ``ClassLabel``, and ``dilm_ray`` holds what
made the set (task, DPC, method, generator, learner, commit) and, once evaluated, its scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dilm_ray.data.tasks import TaskSpec

CARD = "README.md"


def card_header(task: TaskSpec, info: dict[str, Any]) -> dict[str, Any]:
    features = [{"name": c, "dtype": "string"} for c in task.text_columns]
    features.append({"name": "label", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(task.label_names)}}}})
    return {
        "pretty_name": f"{task.name} distilled by {info.get('method', '?')}, DPC {info.get('dpc', '?')}, set {info.get('set_index', 0)}",
        "task_categories": ["text-classification"],
        "tags": ["dataset-distillation", "dilm", "dilm-ray"],
        "size_categories": ["n<1K"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "train.jsonl"}]}],
        "dataset_info": {"features": features},
        "dilm_ray": {"task": task.name, "label_names": list(task.label_names), **info},
    }


def write_card(folder: Path, task: TaskSpec, info: dict[str, Any]) -> Path:
    """Write ``folder/README.md`` for the set in ``folder``; ``info`` (JSON-like values): method,
    dpc, set_index, rows, generator, learner, seed, commit, and optionally label_fidelity
    (fraction) and scores ({learner: {"mean": fraction, "runs": n}})."""
    header = card_header(task, {k: v for k, v in info.items() if v is not None})
    meta = header["dilm_ray"]
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
        f"# {header['pretty_name']}", "",
        f"A distilled training set for **{task.name}** ({', '.join(task.label_names)}): {meta.get('rows', '?')} rows, "
        f"DPC {meta.get('dpc', '?')}, made by **{meta.get('method', '?')}** with dilm-ray, an implementation of DiLM "
        "(Distilling Dataset into Language Model, Maekawa et al., NAACL 2024 Findings, arXiv 2404.00264).", "",
        "| field | value |", "|---|---|",
    ]
    for key in ("method", "dpc", "set_index", "generator", "learner", "seed", "commit", "label_fidelity"):
        if key in meta:
            lines.append(f"| {key} | {meta[key]} |")
    for learner, score in sorted(meta.get("scores", {}).items()):
        lines.append(f"| score, {learner} | {100 * score['mean']:.1f}% over {score['runs']} runs |")
    lines += ["", "```python", "import datasets", f'ds = datasets.load_dataset("{folder.name}")  # this folder', "```", ""]
    path = folder / CARD
    path.write_text("\n".join(lines))
    return path


def read_card(folder: Path) -> dict[str, Any] | None:
    """The ``dilm_ray`` part of the card's header, or None when the folder has no card."""
    path = folder / CARD
    if not path.is_file():
        return None
    text = path.read_text()
    if not text.startswith("---\n"):
        return None
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:]).get("dilm_ray")


def add_scores(folder: Path, task: TaskSpec, scores: dict[str, dict[str, float]]) -> None:
    """Merge per-learner scores into an existing card (no card: nothing to do)."""
    meta = read_card(folder)
    if meta is None:
        return
    info = {k: v for k, v in meta.items() if k not in ("task", "label_names")}
    info["scores"] = {**info.get("scores", {}), **scores}
    write_card(folder, task, info)
