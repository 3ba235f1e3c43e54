"""The config schema shared by every experiment, and its up-front validation.

Config files in `configs/` start from `base_config()` and change what they need; every field exists here with a
default and a one-line comment, so a mistyped `--config.<key>=...` override is an error, never a silent no-op.
"""

import difflib
import json
from typing import Any, Iterable, Optional

import ml_collections

# Logical axis -> mesh axes. A mesh axis of size 1 costs nothing, so the same rules serve data parallelism
# (mesh data=-1), FSDP (fsdp=-1) and tensor parallelism (model=N); the mesh shape alone selects the strategy.
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("head_dim", None),
    ("classes", None),
    ("patch", None),
    ("posemb_tokens", None),
    ("norm", None),
    ("tokens", None),
    ("layers", None),  # The leading [depth] axis of scanned blocks (model.scan_layers).
)

MESH_AXES = ("data", "fsdp", "model")


def base_config(task: str = "classification", model: Optional[str] = None) -> ml_collections.ConfigDict:
    """The schema of a run of `task` (a registered task) with `model` (default: the task's first model): the
    shared keys below, `config.model` (name + that model's keys), the task's own section `config.<task>` (if it
    has one) and `config.evals` (the task's default evaluators). Config files start from it and change what
    they need; every key has a default and a comment where it is defined."""
    from maskjax.evaluate.evaluators import eval_config
    from maskjax.tasks import get_model, get_task, section_schema

    task_cls = get_task(task)
    model = model or task_cls.models[0]
    model_spec = get_model(model)
    c = ml_collections.ConfigDict()
    c.seed = 0  # Root of every random draw (init, dropout, data order, augmentation).
    c.task = task  # A registered task (maskjax.tasks.TASKS): 'classification', 'mim', ...
    c.total_steps = 300  # Optimizer steps to train for.
    c.batch_size = 64  # Global batch size (all hosts, all devices).

    c.data = ml_collections.ConfigDict()
    c.data.name = "builtin_shapes"  # 'builtin_shapes', 'builtin_clips' (video), 'fashion_mnist' or 'tfds:<builder>'.
    c.data.seed = 0  # Seed of the generated built-in data set (fixed while config.seed varies runs).
    c.data.data_dir = ""  # Data directory for TFDS / IDX files ('' = the library default).
    c.data.image_size = 32  # Side of the (square) training images.
    c.data.num_frames = 0  # Frames per clip for video data ('builtin_clips'); 0 = images.
    c.data.train_split = "train"  # Split used for training.
    c.data.eval_split = "validation"  # Split evaluators use unless they name another.
    c.data.train_examples = -1  # Train on the first N examples of the split only (-1 = all; for tests and few-shot).
    c.data.augment = True  # Random crop (pad 4) + horizontal flip on training images.
    c.data.num_threads = 2  # Threads of the input pipeline (grain).
    c.data.prefetch = 2  # Batches prepared ahead of the train step.

    c.model = ml_collections.ConfigDict()
    c.model.name = model  # A registered model (maskjax.tasks.MODELS) the task trains: 'vit', 'mae', ...
    c.model.update(model_spec.schema())
    section = section_schema(task_cls)
    if section is not None:
        c[task] = section

    c.init_from = ml_collections.ConfigDict()  # Start from another run's parameters (fine-tuning).
    c.init_from.workdir = ""  # Workdir of the run whose checkpoint to load ('' = fresh initialisation).
    c.init_from.step = -1  # Its checkpoint step (-1 = latest).
    c.init_from.params_key = ""  # Sub-tree of its parameters to load, '/'-separated (MAE encoder: 'encoder').
    c.init_from.target_key = ""  # Where it goes in this model's parameters ('' = the root; Mask2Former: 'backbone').

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # 'adamw', 'adam', 'sgd' or 'lamb'.
    c.optimizer.learning_rate = 1e-3  # Peak learning rate.
    c.optimizer.schedule = "warmup_cosine"  # 'warmup_cosine', 'warmup_linear' or 'constant'.
    c.optimizer.warmup_steps = 30  # Linear warm-up steps.
    c.optimizer.end_lr_fraction = 0.0  # Final learning rate as a fraction of the peak.
    c.optimizer.b1 = 0.9  # Adam beta1 / SGD momentum.
    c.optimizer.b2 = 0.999  # Adam beta2.
    c.optimizer.weight_decay = 0.05  # Decoupled weight decay (not on biases, norms, embeddings).
    c.optimizer.grad_clip_norm = 1.0  # Clip the global gradient norm (0 = off).
    c.optimizer.accum_steps = 1  # Micro-batches per step (gradient accumulation).

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # Data-parallel axis size (-1 = all remaining devices).
    c.mesh.fsdp = 1  # Fully-sharded data-parallel axis size (-1 = all remaining).
    c.mesh.model = 1  # Tensor-parallel axis size (-1 = all remaining).
    c.sharding_rules = DEFAULT_SHARDING_RULES  # Logical axis name -> mesh axes.

    # Evaluators (maskjax.evaluate.evaluators): config.evals.<name> = type, every (0 = at the end only,
    # -1 = never) and the type's options; metrics land in metrics.jsonl as '<name>/<metric>'.
    c.evals = ml_collections.ConfigDict()
    for name, spec in task_cls.default_evals().items():
        c.evals[name] = eval_config(spec)

    c.log_every = 10  # Steps between metric records (window means); with evaluations and checkpoints, the loop's syncs.
    c.checkpoint_every = 100  # Steps between checkpoints (the last step is always saved).
    c.keep_checkpoints = 3  # Checkpoints kept on disk.
    c.async_checkpointing = True  # Write checkpoints in a background thread.
    c.progress_bar = True  # Live tqdm progress bar on the main process.
    c.profile_steps = ()  # (first, last): write a jax.profiler trace of these steps to <workdir>/profile.
    c.stop_after_steps = -1  # Stop (with a checkpoint) after this many steps of this run (-1 = never; for tests).
    # Resuming with a config that differs from the checkpoint's in a key that breaks exact resumption (model, task,
    # data, optimizer, seed, batch size, ...): 'strict' stops and lists them, 'force' resumes anyway (recorded in
    # the workdir's history.jsonl). Changes to the shapes of the state can never be resumed.
    c.resume_policy = "strict"
    c.lock_stale_seconds = 600  # A workdir lock of another host not refreshed for this long is taken over.
    c.distributed_timeout = 300  # Seconds a multi-process run waits for all its processes to join.
    return c


def eval_config(spec: dict) -> ml_collections.ConfigDict:
    """A `config.evals.<name>` entry from {'type': ..., 'every': ..., option: value}, the other options at their
    defaults, e.g. `c.evals.probe = eval_config({"type": "probe", "train_examples": 10000})`."""
    from maskjax.evaluate.evaluators import eval_config as make_entry
    return make_entry(spec)


RESUME_POLICIES = ("strict", "force")
# Keys a resumed run may change: they alter neither the saved state nor the data and random streams of the steps
# to come (evaluation, logging, checkpoint cadence, the mesh, the attention kernel, probes, the run's length).
RESUME_SAFE_KEYS = (
    "total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "async_checkpointing", "progress_bar",
    "stop_after_steps", "resume_policy", "lock_stale_seconds", "distributed_timeout", "sharding_rules", "profile_steps",
    "data.data_dir", "data.eval_split", "data.num_threads", "data.prefetch", "model.remat",
    "model.remat_policy", "model.attention.backend", "model.attention.block_q", "model.attention.block_k",
    "model.attention.record_max_logit")
RESUME_SAFE_PREFIXES = ("mesh.", "evals.", "init_from.")  # init_from only shapes a fresh start.


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config."""
    keys = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def unknown_key_message(key: str, valid: Iterable[str]) -> str:
    """A message naming a mistyped key and the nearest valid ones."""
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"Unknown config key {key!r}.{hint}"


def schema_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The schema `config` must follow: `base_config` of its task and model, with the options of the evaluator
    types it names under `config.evals`. Errors name an unknown task, model or evaluator type."""
    from maskjax.evaluate.evaluators import schema_of_evals

    reference = base_config(config.task, config.model.get("name"))
    reference.evals = schema_of_evals(config.evals)
    return reference


def check_known_keys(config: ml_collections.ConfigDict, reference: Optional[ml_collections.ConfigDict] = None):
    """Raises ValueError for keys of `config` that its schema does not have (a key of another task's or model's
    section says so)."""
    from maskjax.tasks import TASKS, get_task

    reference = schema_of(config) if reference is None else reference
    valid = set(flat_keys(reference))
    free_form = tuple(f"{config.task}.{sub}." for sub in getattr(get_task(config.task), "free_form", ()))
    for key in flat_keys(config):
        if key.startswith(free_form):
            continue  # checked by their consumer (e.g. the masking strategy's own options)
        if key not in valid and not any(key.startswith(v + ".") for v in valid):
            section = key.split(".")[0]
            if section in TASKS and section != config.task:
                raise ValueError(f"{unknown_key_message(key, valid)} config.{section} is the section of task "
                                 f"{section!r}, but config.task={config.task!r}.")
            if section == "model":
                raise ValueError(f"{unknown_key_message(key, valid)} (model {config.model.name!r} has no such key)")
            raise ValueError(unknown_key_message(key, valid))


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted key: JSON value} of a config (tuples become lists), as stored with every checkpoint."""
    def flatten(tree, prefix):
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out.update(flatten(value, f"{prefix}{name}."))
            else:
                out[f"{prefix}{name}"] = value
        return out
    return flatten(json.loads(config.to_json_best_effort()), "")


def resume_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[dict, dict]:
    """(safe, unsafe) changes {key: (saved value, current value)} between the flat config a checkpoint was saved
    with and the current one. Keys missing on either side (another maskjax version) are not compared."""
    safe, unsafe = {}, {}
    for key in sorted(set(saved) & set(current)):
        if saved[key] != current[key]:
            is_safe = key in RESUME_SAFE_KEYS or key.startswith(RESUME_SAFE_PREFIXES)
            (safe if is_safe else unsafe)[key] = (saved[key], current[key])
    return safe, unsafe


def _fail(key: str, value: Any, why: str):
    raise ValueError(f"config.{key}={value!r}: {why}")


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Checks a config against itself and the device count before any compute; errors name key and value.

    Shared keys here; `config.model` by the model's spec, `config.<task>` by the task, `config.evals` by each
    evaluator type (maskjax.tasks / maskjax.evaluate.evaluators)."""
    from maskjax.evaluate.evaluators import get_evaluator, validate_evals
    from maskjax.tasks import get_model, get_task

    task_cls = get_task(config.task)
    model_spec = get_model(config.model.get("name"))
    if model_spec.name not in task_cls.models:
        _fail("model.name", model_spec.name, f"task {config.task!r} trains {task_cls.models}")
    for name, entry in config.evals.items():  # the options an entry may have depend on its type
        get_evaluator(entry.get("type") if isinstance(entry, ml_collections.ConfigDict) else None,
                      f"evals.{name}.type")
    check_known_keys(config)
    for key in ("total_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if int(config[key]) < 1:
            _fail(key, config[key], "must be >= 1")
    profile = tuple(config.profile_steps)
    if profile and (len(profile) != 2 or not all(isinstance(v, int) for v in profile)
                    or not 1 <= profile[0] <= profile[1] <= int(config.total_steps)):
        _fail("profile_steps", profile, f"must be () or (first, last) with 1 <= first <= last <= total_steps="
              f"{config.total_steps}")
    if config.resume_policy not in RESUME_POLICIES:
        _fail("resume_policy", config.resume_policy, f"must be one of {RESUME_POLICIES}")
    if config.lock_stale_seconds <= 0:
        _fail("lock_stale_seconds", config.lock_stale_seconds, "must be > 0")
    if config.distributed_timeout <= 0:
        _fail("distributed_timeout", config.distributed_timeout, "must be > 0")
    if config.data.image_size <= 0:
        _fail("data.image_size", config.data.image_size, "must be positive")
    if config.data.num_frames < 0:
        _fail("data.num_frames", config.data.num_frames, "must be >= 0 (0 = images)")
    if (config.data.num_frames > 0) != (config.data.name == "builtin_clips"):
        _fail("data.num_frames", config.data.num_frames, f"must be > 0 exactly for video data (data.name="
              f"{config.data.name!r}; 'builtin_clips' is the video source)")

    model_spec.validate(config)
    task_cls.validate_config(config)
    validate_evals(config, task_cls)

    opt = config.optimizer
    if opt.name not in ("adamw", "adam", "sgd", "lamb"):
        _fail("optimizer.name", opt.name, "must be one of 'adamw', 'adam', 'sgd', 'lamb'")
    if opt.schedule not in ("warmup_cosine", "warmup_linear", "constant"):
        _fail("optimizer.schedule", opt.schedule, "must be 'warmup_cosine', 'warmup_linear' or 'constant'")
    if opt.learning_rate <= 0:
        _fail("optimizer.learning_rate", opt.learning_rate, "must be > 0")
    if not 0 <= opt.warmup_steps <= config.total_steps:
        _fail("optimizer.warmup_steps", opt.warmup_steps, f"must be in [0, total_steps={config.total_steps}]")
    if opt.accum_steps < 1:
        _fail("optimizer.accum_steps", opt.accum_steps, "must be >= 1")

    mesh_shape = resolve_mesh_shape(config.mesh, num_devices)
    batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
    micro_batch, rest = divmod(config.batch_size, opt.accum_steps)
    if rest:
        _fail("batch_size", config.batch_size, f"must be divisible by optimizer.accum_steps={opt.accum_steps}")
    if micro_batch % batch_shards:
        _fail("batch_size", config.batch_size, f"the micro-batch {micro_batch} must be divisible by the "
              f"{batch_shards} batch shards of the mesh {mesh_shape} ({num_devices} devices)")
    if config.batch_size % num_processes:
        _fail("batch_size", config.batch_size, f"must be divisible by the number of processes {num_processes}")
    if config.data.train_examples == 0 or config.data.train_examples < -1:
        _fail("data.train_examples", config.data.train_examples, "must be a positive count or -1 (all)")
    if config.data.num_threads < 0 or config.data.prefetch < 0:
        _fail("data.num_threads", config.data.num_threads, "num_threads and prefetch must be >= 0")


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with at most one -1 filled in so that their product is `num_devices`."""
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    unknown = set(mesh_config.keys()) - set(MESH_AXES)
    if unknown:
        _fail(f"mesh.{sorted(unknown)[0]}", mesh_config[sorted(unknown)[0]], f"mesh axes are {MESH_AXES}")
    auto = [axis for axis, size in sizes.items() if size == -1]
    if len(auto) > 1:
        _fail(f"mesh.{auto[1]}", -1, f"only one mesh axis may be -1 (also mesh.{auto[0]})")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            _fail(f"mesh.{axis}", size, "must be a positive size or -1")
    known = 1
    for axis, size in sizes.items():
        if size != -1:
            known *= size
    if auto:
        if num_devices % known:
            _fail(f"mesh.{auto[0]}", -1, f"cannot fill: {num_devices} devices are not divisible by {known}")
        sizes[auto[0]] = num_devices // known
    elif known != num_devices:
        _fail("mesh", dict(sizes), f"uses {known} devices but {num_devices} are available")
    return sizes


def load_config_file(path: str, *, next_to: Optional[str] = None) -> Any:
    """The module of a config file, loaded by path (config files are not a package). `next_to`: a file whose
    directory `path` is relative to (a config file loading a sibling passes its `__file__`)."""
    import importlib.util
    import os

    if next_to is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(next_to)), path)
    name = "maskjax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config_arg(arg: Optional[str], allowed: Iterable[str], config_name: str) -> dict[str, Any]:
    """'runlocal,variant=S/4' -> {'runlocal': True, 'variant': 'S/4'}; unknown names are an error."""
    parsed: dict[str, Any] = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        parsed[key.strip()] = value.strip() if value else True
    unknown = sorted(set(parsed) - set(allowed))
    if unknown:
        raise ValueError(f"{config_name}: unknown argument {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return parsed
