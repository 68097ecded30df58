"""Task specifications: which columns hold text and labels, and what the labels mean."""

from __future__ import annotations

from dataclasses import dataclass

from dilm_ray.config import DataConfig
from dilm_ray.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    label_column: str = "label"
    validation_split: str = "validation"
    hub_path: str | None = None
    hub_name: str | None = None
    metric: str = "accuracy"  # "accuracy" or "accuracy_f1" (mean of both, QQP as in GLUE)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def score_name(self) -> str:
        """What a results table's score is, for its column header and plot axis."""
        return "accuracy" if self.metric == "accuracy" else "mean of accuracy and F1"


BUILTIN_TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", ("sentence",), ("negative", "positive"), hub_path="nyu-mll/glue", hub_name="sst2"),
    "mnli": TaskSpec(
        "mnli",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        validation_split="validation_matched",
        hub_path="nyu-mll/glue",
        hub_name="mnli",
    ),
    "qqp": TaskSpec(
        "qqp",
        ("question1", "question2"),
        ("not_duplicate", "duplicate"),
        hub_path="nyu-mll/glue",
        hub_name="qqp",
        metric="accuracy_f1",
    ),
}


def resolve_task(cfg: DataConfig) -> TaskSpec:
    """The built-in spec, with any column/label settings from the config taking precedence."""
    base = BUILTIN_TASKS.get(cfg.task)
    if base is None:
        if not cfg.text_columns or not cfg.label_names or cfg.path is None:
            raise UserError(
                f"data.task '{cfg.task}' is not built in ({', '.join(BUILTIN_TASKS)}): "
                "a custom task needs data.path, data.text_columns and data.label_names"
            )
        return TaskSpec(
            name=cfg.task,
            text_columns=tuple(cfg.text_columns),
            label_names=tuple(cfg.label_names),
            label_column=cfg.label_column,
            validation_split=cfg.validation_split or "validation",
        )
    return TaskSpec(
        name=base.name,
        text_columns=tuple(cfg.text_columns) if cfg.text_columns else base.text_columns,
        label_names=tuple(cfg.label_names) if cfg.label_names else base.label_names,
        label_column=cfg.label_column,
        validation_split=cfg.validation_split or base.validation_split,
        hub_path=base.hub_path,
        hub_name=base.hub_name,
        metric=base.metric,
    )
