"""Tasks own losses, evaluation metrics and visualisations; they know nothing of meshes or checkpoints. A task that
needs another run's frozen weights (a MIM teacher) gets a reader of them from whoever wires it (the trainer passes
`maskjax.train.checkpoint.load_params`), so tasks never import the training package."""

from typing import Callable, Optional

from maskjax.tasks import mim
from maskjax.tasks.classification import ClassificationTask
from maskjax.tasks.common import attention_from_config
from maskjax.tasks.mim import MIMTask

__all__ = ["TASKS", "ClassificationTask", "MIMTask", "attention_from_config", "make_task", "validate_task_config"]

TASKS = {"classification": ClassificationTask, "mim": MIMTask}
CONFIG_VALIDATORS = {"mim": mim.validate_config}  # a task's own config keys (classification has none)


def validate_task_config(config) -> None:
    """ValueErrors naming the bad key of `config.task`'s own settings (e.g. `config.mim`), before any compute."""
    if config.task in CONFIG_VALIDATORS:
        CONFIG_VALIDATORS[config.task](config)


def make_task(config, *, load_params: Optional[Callable] = None):
    """The task named by `config.task`. `load_params(workdir, step, params_key, config_key=...) -> (params, step)`
    reads another run's weights, for the tasks that use one (`mim.teacher`)."""
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r}: must be one of {sorted(TASKS)}")
    return TASKS[config.task](config, load_params=load_params)
