"""Tasks, loading and subsampling of labelled text."""

from dilm_ray.data.dataset import TextSet
from dilm_ray.data.loading import TaskData, load_data, load_file, load_split, subsample
from dilm_ray.data.tasks import BUILTIN_TASKS, TaskSpec, resolve_task

__all__ = ["BUILTIN_TASKS", "TaskData", "TaskSpec", "TextSet", "load_data", "load_file", "load_split", "resolve_task", "subsample"]
