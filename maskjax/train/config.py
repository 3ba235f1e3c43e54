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
)

MESH_AXES = ("data", "fsdp", "model")


def base_config() -> ml_collections.ConfigDict:
    """Returns the full schema with defaults (supervised ViT on the built-in data)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Root of every random draw (init, dropout, data order, augmentation).
    c.task = "classification"  # One of maskjax.tasks.TASKS.
    c.total_steps = 300  # Optimizer steps to train for.
    c.batch_size = 64  # Global batch size (all hosts, all devices).

    c.data = ml_collections.ConfigDict()
    c.data.name = "builtin_shapes"  # 'builtin_shapes', 'builtin_clips' (video), 'fashion_mnist' or 'tfds:<builder>'.
    c.data.seed = 0  # Seed of the generated built-in data set (fixed while config.seed varies runs).
    c.data.data_dir = ""  # Data directory for TFDS / IDX files ('' = the library default).
    c.data.image_size = 32  # Side of the (square) training images.
    c.data.num_frames = 0  # Frames per clip for video data ('builtin_clips'); 0 = images.
    c.data.train_split = "train"  # Split used for training.
    c.data.eval_split = "validation"  # Split used for periodic evaluation.
    c.data.train_examples = -1  # Train on the first N examples of the split only (-1 = all; for tests and few-shot).
    c.data.augment = True  # Random crop (pad 4) + horizontal flip on training images.
    c.data.num_threads = 2  # Threads of the input pipeline (grain).
    c.data.prefetch = 2  # Batches prepared ahead of the train step.

    c.model = ml_collections.ConfigDict()
    c.model.name = "vit"  # Model family.
    c.model.variant = "Ti/4"  # '<size>/<patch>': size in mu, Ti, S, M, B, L, H.
    c.model.tubelet_size = 0  # Video: frames per tubelet token (VideoMAE: 2); 0 = image model.
    c.model.depth = -1  # Override the variant's depth (-1 = keep).
    c.model.width = -1  # Override the variant's width (-1 = keep).
    c.model.num_heads = -1  # Override the variant's number of heads (-1 = keep).
    c.model.mlp_dim = -1  # Override the variant's MLP width (-1 = keep).
    c.model.num_classes = 10  # Classifier outputs; must match the data set.
    c.model.class_token = True  # Prepend a learned [cls] token.
    c.model.num_registers = 0  # Extra register tokens (Darcet et al. 2023).
    c.model.posemb = "learn"  # 'learn' or 'sincos2d'.
    c.model.pool = "cls"  # 'cls' or 'gap' (global average of patch tokens).
    c.model.dropout = 0.0  # Dropout rate in MLPs and on embeddings.
    c.model.drop_path_rate = 0.1  # Stochastic depth at the last block (linear ramp from 0).
    c.model.layer_scale_init = 0.0  # LayerScale initial value (0 = off).
    c.model.dtype = "float32"  # Compute dtype ('float32' or 'bfloat16'); parameters stay float32.
    c.model.remat = False  # Rematerialise blocks in the backward pass to save memory.
    c.model.attention = attention_config()

    c.mim = ml_collections.ConfigDict()  # Masked image modeling (task='mim'); the encoder is `model`.
    c.mim.mode = "mae"  # 'mae' (encoder on visible patches only) or 'mask_token' (SimMIM / BEiT style).
    c.mim.mask_ratio = 0.75  # Fraction of patches masked (exact count per image).
    # Strategy of maskjax.masking: 'random', 'block', 'grid', 'noise', 'checkerboard', 'attention' (AttMask),
    # 'hard_patch' (HPM).
    c.mim.masking = "random"
    c.mim.masking_options = ml_collections.ConfigDict()  # Keyword options of the strategy (e.g. min_num_patches).
    # "pixels", "norm_pixels" (per-patch normalised, MAE), "hog" (MaskFeat) or "teacher" (mim.teacher's features).
    c.mim.target = "norm_pixels"
    c.mim.attention_scores = "self"  # AttMask's scores: 'self' (the encoder in training) or 'teacher' (mim.teacher).
    c.mim.hard_patch_alpha_max = 0.5  # HPM: hardest share of the masked patches at the end (from 0, linear).
    c.mim.loss_predictor_weight = 1.0  # HPM: weight of the loss predictor's pairwise ranking loss.
    c.mim.teacher = ml_collections.ConfigDict()  # A frozen maskjax ViT (target 'teacher', AttMask 'teacher').
    c.mim.teacher.workdir = ""  # Workdir of the teacher's run (its config.json and checkpoints).
    c.mim.teacher.step = -1  # Its checkpoint step (-1 = latest).
    c.mim.teacher.params_key = "auto"  # Its encoder's parameter sub-tree ('auto': 'encoder' for MIM runs, else '').
    c.mim.decoder_width = 128  # Decoder transformer width.
    c.mim.decoder_depth = 2  # Decoder blocks (0 = linear head on the encoder output).
    c.mim.decoder_heads = 4  # Decoder attention heads.
    c.mim.decoder_mlp_dim = 512  # Decoder MLP width.

    c.init_from = ml_collections.ConfigDict()  # Start from another run's parameters (fine-tuning).
    c.init_from.workdir = ""  # Workdir of the run whose checkpoint to load ('' = fresh initialisation).
    c.init_from.step = -1  # Its checkpoint step (-1 = latest).
    c.init_from.params_key = ""  # Sub-tree of its parameters to load, '/'-separated (MAE encoder: 'encoder').

    c.probe = ml_collections.ConfigDict()  # Frozen-feature evaluation at the end of training.
    c.probe.enabled = False  # Linear probe + k-NN on the task's features (MIM: mean of encoder patch tokens).
    c.probe.train_examples = 5000  # Train-split examples the probes fit on (-1 = all; no augmentation).
    c.probe.eval_examples = -1  # Eval-split examples they are scored on (-1 = all).
    c.probe.random_init = True  # Also probe the same model at its initialisation (this run's step 0).
    c.probe.knn_k = 20  # Neighbours of the k-NN classifier.
    c.probe.features = "cls"  # MIM encoders: 'cls' token (MAE's protocol) or 'gap' (mean of patch tokens).

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.0  # Label smoothing of the softmax cross-entropy.
    c.loss.masksub_ratio = 0.0  # MaskSub: fraction of patches dropped in a self-distilled sub-branch (0 = off).
    c.loss.masksub_weight = 1.0  # MaskSub: weight of the sub-branch's KL loss.

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

    c.log_every = 10  # Steps between metric records.
    c.eval_every = 100  # Steps between evaluations (0 = only at the end).
    c.eval_batch_size = 256  # Global batch size of evaluation.
    c.eval_examples = -1  # Evaluate on the first N examples of the split (-1 = all).
    c.checkpoint_every = 100  # Steps between checkpoints (the last step is always saved).
    c.keep_checkpoints = 3  # Checkpoints kept on disk.
    c.async_checkpointing = True  # Write checkpoints in a background thread.
    c.num_visualize = 16  # Validation examples drawn with their predictions at the end.
    c.progress_bar = True  # Live tqdm progress bar on the main process.
    c.stop_after_steps = -1  # Stop (with a checkpoint) after this many steps of this run (-1 = never; for tests).
    # Resuming with a config that differs from the checkpoint's in a key that breaks exact resumption (model, task,
    # data, optimizer, seed, batch size, ...): 'strict' stops and lists them, 'force' resumes anyway (recorded in
    # the workdir's history.jsonl). Changes to the shapes of the state can never be resumed.
    c.resume_policy = "strict"
    c.lock_stale_seconds = 600  # A workdir lock of another host not refreshed for this long is taken over.
    c.distributed_timeout = 300  # Seconds a multi-process run waits for all its processes to join.
    return c


RESUME_POLICIES = ("strict", "force")
# Keys a resumed run may change: they alter neither the saved state nor the data and random streams of the steps
# to come (evaluation, logging, checkpoint cadence, the mesh, the attention kernel, probes, the run's length).
RESUME_SAFE_KEYS = (
    "total_steps", "log_every", "eval_every", "eval_batch_size", "eval_examples", "checkpoint_every",
    "keep_checkpoints", "async_checkpointing", "num_visualize", "progress_bar", "stop_after_steps", "resume_policy",
    "lock_stale_seconds", "distributed_timeout", "sharding_rules", "data.data_dir", "data.eval_split",
    "data.num_threads", "data.prefetch", "model.remat", "model.attention.backend", "model.attention.block_q",
    "model.attention.block_k", "model.attention.record_max_logit")
RESUME_SAFE_PREFIXES = ("mesh.", "probe.", "init_from.")  # init_from only shapes a fresh start.


# Sub-trees whose keys depend on another setting (validated by the code that consumes them).
FREE_FORM_PREFIXES = ("mim.masking_options.",)


def attention_config() -> ml_collections.ConfigDict:
    """`model.attention`: backend, approximate-gradient layers, bounded logits and a token mask on the patch grid."""
    a = ml_collections.ConfigDict()
    a.backend = "auto"  # 'auto', 'reference', 'blocked', 'pallas' or 'approx' (maskjax.attention.attention).
    a.block_q = 0  # Query tile of 'blocked' / 'pallas' (0 = the backend's default).
    a.block_k = 0  # Key tile of 'blocked' / 'pallas' (0 = the backend's default).
    a.approx_mode = "lowrank"  # 'approx' backend: 'lowrank', 'exact_fwd' (exact forward) or 'paper'.
    a.approx_degree = 2  # 'approx' backend: even Taylor degree of the low-rank kernel.
    a.approx_window = 0  # 'approx' backend: width of the exactly computed local window (0 = none).
    a.approx_layers = ()  # Block indices that use 'approx' while the others use `backend` (() = per `backend`).
    a.logit_bound = 0.0  # > 0: normalised q, k with a learned temperature so |logit| <= bound (0 = off).
    a.record_max_logit = False  # Log the observed max |logit| per block (metric max_abs_logit/block_<i>).
    a.mask = "none"  # Token mask on the patch grid: 'none', 'window_2d', 'swin' or 'directional_2d'.
    a.radius = (1, 1)  # window_2d: neighbourhood radius (rows, cols) in (dilated) grid steps.
    a.dilation = (1, 1)  # window_2d: dilation (rows, cols).
    a.window = (4, 4)  # swin: partition size (rows, cols) in patches.
    a.shifted = True  # swin: odd blocks shift the partition by half a window.
    a.directions = ()  # directional_2d: one view direction per head, degrees (0 = right, 90 = up).
    a.fov = 90.0  # directional_2d: field of view in degrees.
    a.max_distance = 0.0  # directional_2d: reach in grid units (0 = unlimited).
    a.prefix_sees_grid = True  # cls/register tokens attend to every patch.
    a.grid_sees_prefix = True  # Every patch attends to the cls/register tokens.
    return a


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


def check_known_keys(config: ml_collections.ConfigDict, reference: Optional[ml_collections.ConfigDict] = None):
    """Raises ValueError for keys of `config` that the schema does not have."""
    reference = base_config() if reference is None else reference
    valid = set(flat_keys(reference))
    for key in flat_keys(config):
        if key.startswith(FREE_FORM_PREFIXES):
            continue  # checked by their consumer (e.g. the masking strategy's own options)
        if key not in valid and not any(key.startswith(v + ".") for v in valid):
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
    """Checks a config against itself and the device count before any compute; errors name key and value."""
    check_known_keys(config)
    from maskjax.models.vit import decode_variant  # Local import: configs must stay importable without models.
    from maskjax.tasks import TASKS, attention_from_config, validate_task_config

    if config.task not in TASKS:
        _fail("task", config.task, f"must be one of {sorted(TASKS)}")
    for key in ("total_steps", "batch_size", "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if int(config[key]) < 1:
            _fail(key, config[key], "must be >= 1")
    if config.resume_policy not in RESUME_POLICIES:
        _fail("resume_policy", config.resume_policy, f"must be one of {RESUME_POLICIES}")
    if config.lock_stale_seconds <= 0:
        _fail("lock_stale_seconds", config.lock_stale_seconds, "must be > 0")
    if config.distributed_timeout <= 0:
        _fail("distributed_timeout", config.distributed_timeout, "must be > 0")
    if config.eval_every < 0:
        _fail("eval_every", config.eval_every, "must be >= 0")
    if config.eval_examples == 0 or config.eval_examples < -1:
        _fail("eval_examples", config.eval_examples, "must be a positive count or -1 (all)")
    try:
        variant = decode_variant(config.model.variant)
    except ValueError as e:
        _fail("model.variant", config.model.variant, str(e))
    for key in ("depth", "width", "num_heads", "mlp_dim"):
        if config.model[key] == 0 or config.model[key] < -1:
            _fail(f"model.{key}", config.model[key], "must be a positive size or -1 (keep the variant's)")
        if config.model[key] > 0:
            variant[key] = config.model[key]
    if variant["width"] % variant["num_heads"]:
        _fail("model.width", variant["width"], f"must be divisible by num_heads={variant['num_heads']} "
              f"(model.variant={config.model.variant!r}, model.width / model.num_heads overrides)")
    patch = variant["patch_size"]
    if config.data.image_size <= 0 or config.data.image_size % patch:
        _fail("data.image_size", config.data.image_size, f"must be a positive multiple of the patch size {patch} "
              f"(model.variant={config.model.variant!r})")
    if config.model.posemb not in ("learn", "sincos2d"):
        _fail("model.posemb", config.model.posemb, "must be 'learn' or 'sincos2d'")
    if config.model.pool not in ("cls", "gap"):
        _fail("model.pool", config.model.pool, "must be 'cls' or 'gap'")
    if config.model.pool == "cls" and not config.model.class_token:
        _fail("model.pool", config.model.pool, "needs model.class_token=True")
    if config.model.dtype not in ("float32", "bfloat16"):
        _fail("model.dtype", config.model.dtype, "must be 'float32' or 'bfloat16'")
    if config.model.num_classes < 1:
        _fail("model.num_classes", config.model.num_classes, "must be >= 1")
    if not 0.0 <= config.model.drop_path_rate < 1.0:
        _fail("model.drop_path_rate", config.model.drop_path_rate, "must be in [0, 1)")
    options, token_mask = attention_from_config(config.model.attention)
    depth = variant["depth"]
    if options.approx_layers is not None and not all(0 <= i < depth for i in options.approx_layers):
        _fail("model.attention.approx_layers", config.model.attention.approx_layers,
              f"block indices must be in [0, depth={depth})")
    if token_mask.kind == "directional_2d" and len(token_mask.directions) != variant["num_heads"]:
        _fail("model.attention.directions", config.model.attention.directions,
              f"needs one angle per head ({variant['num_heads']} heads in model.variant={config.model.variant!r})")
    if token_mask.kind != "none" and (options.backend == "approx" or options.approx_layers is not None):
        _fail("model.attention.mask", token_mask.kind, "cannot be combined with approx attention layers")

    video = config.data.num_frames > 0
    if config.data.num_frames < 0:
        _fail("data.num_frames", config.data.num_frames, "must be >= 0 (0 = images)")
    if video != (config.data.name == "builtin_clips"):
        _fail("data.num_frames", config.data.num_frames, f"must be > 0 exactly for video data (data.name="
              f"{config.data.name!r}; 'builtin_clips' is the video source)")
    if video != (config.model.tubelet_size > 0) or config.model.tubelet_size < 0:
        _fail("model.tubelet_size", config.model.tubelet_size, "must be >= 1 for video (data.num_frames > 0) and 0 "
              "for images")
    if video and config.data.num_frames % config.model.tubelet_size:
        _fail("data.num_frames", config.data.num_frames, f"must be a multiple of model.tubelet_size="
              f"{config.model.tubelet_size}")
    if video and config.model.posemb != "sincos2d":
        _fail("model.posemb", config.model.posemb, "video models use 'sincos2d' (fixed space-time sin-cos)")

    validate_task_config(config)  # the task's own keys (e.g. config.mim), after the model's

    if not 0.0 <= config.loss.masksub_ratio < 1.0:
        _fail("loss.masksub_ratio", config.loss.masksub_ratio, "must be in [0, 1) (0 = off)")
    if config.loss.masksub_ratio > 0 and config.model.attention.mask != "none":
        _fail("loss.masksub_ratio", config.loss.masksub_ratio, "cannot be combined with a token mask "
              f"(model.attention.mask={config.model.attention.mask!r}): the sub-branch drops patches")
    if config.probe.enabled:
        if config.probe.train_examples == 0 or config.probe.train_examples < -1:
            _fail("probe.train_examples", config.probe.train_examples, "must be a positive count or -1 (all)")
        if config.probe.eval_examples == 0 or config.probe.eval_examples < -1:
            _fail("probe.eval_examples", config.probe.eval_examples, "must be a positive count or -1 (all)")
        if config.probe.knn_k < 1:
            _fail("probe.knn_k", config.probe.knn_k, "must be >= 1")
        if config.probe.features not in ("cls", "gap"):
            _fail("probe.features", config.probe.features, "must be 'cls' or 'gap'")
        if config.probe.features == "cls" and not config.model.class_token:
            _fail("probe.features", config.probe.features, "needs model.class_token=True (or use 'gap')")

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
    if config.eval_batch_size % batch_shards or config.eval_batch_size % num_processes:
        _fail("eval_batch_size", config.eval_batch_size,
              f"must be divisible by the {batch_shards} batch shards and {num_processes} processes")
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
