"""Tasks own losses, evaluation metrics and visualisations; they know nothing of meshes (a MIM teacher is the one
checkpoint a task reads: another run's frozen weights)."""

from maskjax.tasks.classification import ClassificationTask
from maskjax.tasks.mim import MIMTask

TASKS = {"classification": ClassificationTask, "mim": MIMTask}


def make_task(config):
    """The task named by `config.task`."""
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r}: must be one of {sorted(TASKS)}")
    return TASKS[config.task](config)
