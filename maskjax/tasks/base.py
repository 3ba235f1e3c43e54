"""The contract between the trainer and a model family, and the registries of tasks and models.

A family plugs in with a task (this Protocol), registered by name with `register_task`, and the models it trains,
registered with `register_model`. The trainer (`maskjax.train`) calls nothing else: it knows no batch field, no
model and no metric by name. See docs/architecture.md, "The task contract" and "Adding a model family".

Shapes: B batch (a global batch inside jit; numpy on the host in `visualize`), H x W image size, C channels
(videos add T frames after B). Batches are dicts of the fields in `batch_fields`, as the loader serves them
(`maskjax.data.pipeline`): 'image' float32 [B, H, W, C] in [-1, 1] ([B, T, H, W, C] for video), 'label' int32 [B],
'semantic' / 'instance' int32 [B, H, W], ...; evaluation batches add 'valid' bool [B] (False on padding rows).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, ClassVar, Mapping, Optional, Protocol, Sequence, runtime_checkable

import jax
import ml_collections
import numpy as np

Batch = Mapping[str, jax.Array]


@runtime_checkable
class Task(Protocol):
    """What the trainer and the evaluators call. Everything a family needs beyond it stays inside the family."""

    name: ClassVar[str]  # config.task; also the name of its config section config.<name>, if it has one.
    models: ClassVar[tuple[str, ...]]  # config.model.name values it can train (registered models).
    feature_kinds: ClassVar[tuple[str, ...]]  # kinds `features` accepts (first = default); () = no probes.
    # Loader fields `init` / `loss` / `eval_sums` / `predict` read; 'image' is always among them (the loader
    # resizes and augments every field along with it), e.g. ('image', 'label') or ('image', 'semantic').
    batch_fields: tuple[str, ...]
    # Optional: sub-sections of config.<name> whose keys the schema does not fix (checked by their consumer),
    # e.g. MIM's ('masking_options',). Read by maskjax.train.config.check_known_keys.
    free_form: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def config_section(cls) -> Optional[ml_collections.ConfigDict]:
        """Schema of `config.<name>`: every key with its default and a one-line comment; None = no section."""

    @classmethod
    def default_evals(cls) -> dict[str, dict]:
        """Evaluators a config of this task starts with: {name: {'type': ..., 'every': ..., option: value}}."""

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        """ValueErrors naming `config.<key>=<value>` for bad settings of this task, before any compute."""

    def __init__(self, config: ml_collections.ConfigDict, *, load_params: Optional[Callable] = None):
        """`load_params(workdir, step, params_key, config_key=...) -> (numpy params, step)` reads another run's
        weights (e.g. a frozen teacher); the trainer passes `maskjax.train.checkpoint.load_params`."""

    def check_data(self, source: Any) -> None:
        """ValueErrors naming the config key when the training source cannot serve this task (class count,
        fields), before any compute. `source`: random access, `len`, optional `num_classes`, `class_names`."""

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        """Model variables (parameters boxed with logical axis names) for a batch of the loader's shapes."""

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True,
             step: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss to minimise, {name: scalar batch mean}); `step` is the optimizer step (int32 [])."""

    def eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """{name: sum over the valid rows of the batch (a scalar or a fixed-shape array)}, including 'count';
        summed over batches."""

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Metrics of a whole split from the summed `eval_sums`."""

    def predict(self, params: Any, batch: Batch) -> Any:
        """Predictions for `visualize` (arrays with leading dimension B), e.g. classes [B] or images."""

    def visualize(self, batch: Mapping[str, np.ndarray], predictions: Any,
                  class_names: Optional[Sequence[str]] = None) -> np.ndarray:
        """A uint8 [H', W', 3] picture of a few examples and their predictions."""

    def features(self, params: Any, batch: Batch, kind: str) -> jax.Array:
        """Frozen features float32 [B, D] for probes, from a batch holding at least 'image'; `kind` is one of
        `feature_kinds`. Optional classmethod `check_feature_kind(config, kind, key)`: a ValueError naming
        `config.<key>` when this config's model cannot give that kind (read by the probe evaluator)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model family's entry in the registry: how `config.model` describes it and how to check it.

    schema: () -> ConfigDict of the keys of `config.model` besides 'name', with defaults and comments.
    validate: (config) -> None, ValueErrors naming `config.model.<key>` (the whole config: some checks need the
      data's image size).
    build: (config) -> the Flax module `config.model` describes.
    """
    name: str
    schema: Callable[[], ml_collections.ConfigDict]
    validate: Callable[[ml_collections.ConfigDict], None]
    build: Callable[[ml_collections.ConfigDict], Any]


TASKS: dict[str, type] = {}
MODELS: dict[str, ModelSpec] = {}


def _unknown(key: str, kind: str, name: Any, known: Mapping[str, Any]) -> ValueError:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"config.{key}={name!r}: unknown {kind}; registered: {', '.join(sorted(known))}.{hint}")


def register_task(cls: type) -> type:
    """Class decorator: makes `config.task=cls.name` select `cls`."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name` (the config.task value)")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is registered twice ({TASKS[cls.name].__name__}, {cls.__name__})")
    TASKS[cls.name] = cls
    return cls


def register_model(spec: ModelSpec) -> ModelSpec:
    """Makes `config.model.name=spec.name` valid, with `spec.schema()` as its keys."""
    if spec.name in MODELS and MODELS[spec.name] != spec:
        raise ValueError(f"model {spec.name!r} is registered twice")
    MODELS[spec.name] = spec
    return spec


def get_task(name: str) -> type:
    """The registered task class `name`; the error lists what exists."""
    if name not in TASKS:
        raise _unknown("task", "task", name, TASKS)
    return TASKS[name]


def get_model(name: str) -> ModelSpec:
    if name not in MODELS:
        raise _unknown("model.name", "model", name, MODELS)
    return MODELS[name]


def build_model(config: ml_collections.ConfigDict) -> Any:
    """The module of the registered model `config.model.name`, built from `config`."""
    return get_model(config.model.name).build(config)


def section_schema(task_cls: type) -> Optional[ml_collections.ConfigDict]:
    """The task's config section, or None when it has none."""
    section = task_cls.config_section()
    return None if section is None else ml_collections.ConfigDict(section)
