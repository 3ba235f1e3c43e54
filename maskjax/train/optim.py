"""Optimizer and learning-rate schedule from config."""

import re

import jax
import ml_collections
import optax

# Parameters that are not weight-decayed besides biases and norms (every parameter with fewer than 2 dims).
_NO_DECAY = re.compile(r"(posemb|pos_embedding|cls|register|mask_token)", re.IGNORECASE)


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step."""
    peak, warmup = opt.learning_rate, opt.warmup_steps
    end = peak * opt.end_lr_fraction
    if opt.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup])
    if opt.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end)
    if opt.schedule == "warmup_linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)),
             optax.linear_schedule(peak, end, max(total_steps - warmup, 1))], [warmup])
    raise ValueError(f"config.optimizer.schedule={opt.schedule!r} is not a known schedule")


def decay_mask(params):
    """True for parameters that get weight decay: matrices and kernels, not biases, norms or embeddings."""
    def wants_decay(path, leaf):
        return leaf.ndim >= 2 and not _NO_DECAY.search(jax.tree_util.keystr(path))
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                               optax.Schedule]:
    """The optax transformation (clipping + optimizer) and its schedule."""
    schedule = make_schedule(opt, total_steps)
    if opt.name == "adamw":
        core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
    elif opt.name == "adam":
        core = optax.adam(schedule, b1=opt.b1, b2=opt.b2)
    elif opt.name == "lamb":
        core = optax.lamb(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
    elif opt.name == "sgd":
        core = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
                           optax.sgd(schedule, momentum=opt.b1 or None))
    else:
        raise ValueError(f"config.optimizer.name={opt.name!r} is not a known optimizer")
    if opt.grad_clip_norm > 0:
        core = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), core)
    return core, schedule
