"""Tasks own losses, evaluation metrics and visualisations; they know nothing of meshes or checkpoints. Each task
module registers its task (`maskjax.tasks.base.register_task`) and the models it trains (`register_model`) when
imported here; the trainer finds them by `config.task` and `config.model.name`. A task that needs another run's
frozen weights (a MIM teacher) gets a reader of them from whoever wires it (the trainer passes
`maskjax.train.checkpoint.load_params`), so tasks never import the training package. See docs/architecture.md."""

from typing import Callable, Optional

# Importing the family modules registers their tasks, models and evaluator types.
from maskjax.tasks import classification, maskgit, mim, sample_quality, segmentation, tokenizer  # noqa: F401
from maskjax.tasks.base import MODELS, TASKS, ModelSpec, Task, build_model, get_model, get_task, register_model, \
    register_task, section_schema
from maskjax.tasks.classification import ClassificationTask
from maskjax.tasks.common import attention_from_config
from maskjax.tasks.mim import MIMTask

__all__ = ["TASKS", "MODELS", "Task", "ModelSpec", "ClassificationTask", "MIMTask", "attention_from_config",
           "get_task", "get_model", "build_model", "register_task", "register_model", "section_schema", "make_task"]


def make_task(config, *, load_params: Optional[Callable] = None):
    """The task named by `config.task`, built for `config`. `load_params(workdir, step, params_key, config_key=...)
    -> (params, step)` reads another run's weights, for the tasks that use one (`mim.teacher`)."""
    return get_task(config.task)(config, load_params=load_params)
