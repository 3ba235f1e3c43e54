"""Representation evaluation on frozen features: feature extraction, linear probe, weighted k-NN, and PSNR.

Typical use with a maskjax ViT (any feature function works; nothing here depends on a model):

    feature_fn = lambda variables, images: model.apply(variables, images, train=False)[1]["pre_logits"]
    train_x, train_y = extract_features(feature_fn, variables, train_eval_loader)
    test_x, test_y = extract_features(feature_fn, variables, test_eval_loader)
    linear_probe(train_x, train_y, test_x, test_y, num_classes=10)["test_accuracy"]
    knn_classifier(train_x, train_y, test_x, test_y, num_classes=10)["top1_accuracy"]

With several processes, each process's `extract_features` returns the features of its own (local) batches.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import functools
import itertools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from maskjax.evaluate.metrics import softmax_cross_entropy

# BatchNorm1d(affine=False, eps=1e-6) in MAE's linear probing: the same standardisation of the features.
STANDARDIZE_EPS = 1e-6
# Default sweep of the linear probe, picked on a held-out part of the train features (see `linear_probe`).
# With standardised features, Adam at 0.1 reaches the regularised optimum in 300 steps (objective within 1e-4 of
# L-BFGS in the tests); 0.01 stops short of it, which acts as extra (early-stopping) regularisation. Weight decay
# is the real regulariser: 0 (MAE's probe uses none) up to 1e-2, for small or noisy probe sets.
DEFAULT_LEARNING_RATES = (0.01, 0.1)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


# --------------------------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------------------------

def _array_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterable[dict[str, np.ndarray]]:
    """Fixed-size batches of whole arrays; the last one padded with copies of example 0 and marked in 'valid'."""
    n = len(images)
    for start in range(0, n, batch_size):
        positions = np.arange(start, start + batch_size)
        valid = positions < n
        take = np.where(valid, positions, 0)
        yield {"image": images[take], "label": labels[take], "valid": valid}


def _as_batches(loader_or_arrays: Any, batch_size: int) -> Iterable[Mapping[str, Any]]:
    if isinstance(loader_or_arrays, Mapping):  # One dict of whole arrays.
        if "image" not in loader_or_arrays or "label" not in loader_or_arrays:
            raise ValueError(f"loader_or_arrays as a dict needs 'image' and 'label', got keys "
                             f"{sorted(loader_or_arrays)}")
        arrays = (loader_or_arrays["image"], loader_or_arrays["label"])
    elif (isinstance(loader_or_arrays, tuple) and len(loader_or_arrays) == 2
          and all(hasattr(a, "ndim") for a in loader_or_arrays)):  # (images, labels).
        arrays = loader_or_arrays
    else:
        return loader_or_arrays  # An iterable of batch dicts (e.g. maskjax.data.pipeline.EvalLoader).
    images, labels = np.asarray(arrays[0]), np.asarray(arrays[1])
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be [N] with N={len(images)} (the number of images), got shape {labels.shape}")
    if len(images) == 0:
        raise ValueError("images is empty (N=0)")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return _array_batches(images, labels, batch_size)


def _check_batch(batch: Mapping[str, Any], index: int) -> tuple[Any, np.ndarray, np.ndarray]:
    if "image" not in batch or "label" not in batch:
        raise ValueError(f"batch {index} needs 'image' and 'label', got keys {sorted(batch)}")
    images, labels = batch["image"], np.asarray(batch["label"])
    if not hasattr(images, "dtype"):
        images = np.asarray(images)
    if np.ndim(images) not in (4, 5):
        raise ValueError(f"batch {index}: 'image' must be [b, H, W, C] (or clips [b, T, H, W, C]), got shape "
                         f"{np.shape(images)}")
    b = np.shape(images)[0]
    if labels.shape != (b,):
        raise ValueError(f"batch {index}: 'label' must be [{b}], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"batch {index}: 'label' must be integer, got dtype {labels.dtype}")
    valid = np.ones((b,), bool) if batch.get("valid") is None else np.asarray(batch["valid"])
    if valid.shape != (b,) or valid.dtype != np.bool_:
        raise ValueError(f"batch {index}: 'valid' must be bool [{b}], got {valid.dtype} {valid.shape}")
    return images, labels, valid


def extract_features(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, loader_or_arrays: Any, *,
                     batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Runs `jax.jit(apply_fn)(params, images [b, H, W, C]) -> features [b, D]` over a data set.

    Args:
      apply_fn: the feature function; params are passed as an argument (not closed over) so they are not baked
        into the compiled program.
      params: its first argument (e.g. the model variables).
      loader_or_arrays: an iterable of batch dicts with 'image' [b, H, W, C], 'label' int [b] and optionally
        'valid' bool [b] (False on padding rows, as `maskjax.data.pipeline.EvalLoader` yields them); or whole
        arrays as `(images [N, H, W, C], labels [N])` or `{'image': ..., 'label': ...}`, which are cut into
        batches of `batch_size` (the last one padded, so one compilation serves all).
      batch_size: batch size for whole arrays; ignored for an iterable of batches.

    Returns:
      (features float32 [N, D], labels int32 [N]) of the valid rows, in input order.
    """
    batches = _as_batches(loader_or_arrays, batch_size)
    feature_fn = jax.jit(apply_fn)
    features, labels = [], []
    pending = None  # (device features, valid) of the previous batch: fetched after the next one is dispatched.
    out_struct = None
    for index, batch in enumerate(batches):
        images, batch_labels, valid = _check_batch(batch, index)
        if out_struct is None or out_struct[0] != np.shape(images):
            struct = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct(np.shape(images), images.dtype))
            if not isinstance(struct, jax.ShapeDtypeStruct) or len(struct.shape) != 2 \
                    or struct.shape[0] != np.shape(images)[0]:
                raise ValueError(f"apply_fn must return one array [b, D] for images {np.shape(images)}, got {struct}")
            out_struct = (np.shape(images), struct)
        current = (feature_fn(params, images), valid)
        labels.append(batch_labels[valid].astype(np.int32))
        if pending is not None:
            features.append(np.asarray(pending[0], np.float32)[pending[1]])
        pending = current
    if pending is None:
        raise ValueError("loader_or_arrays yielded no batches")
    features.append(np.asarray(pending[0], np.float32)[pending[1]])
    return np.concatenate(features), np.concatenate(labels)


# --------------------------------------------------------------------------------------------------------------
# Input checks shared by the classifiers
# --------------------------------------------------------------------------------------------------------------

def _check_split(features: Any, labels: Any, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2:
        raise ValueError(f"{name}_features must be [N, D], got shape {features.shape}")
    if labels.ndim != 1 or len(labels) != len(features):
        raise ValueError(f"{name}_labels must be [N] with N={len(features)} ({name}_features rows), "
                         f"got shape {labels.shape}")
    if len(features) == 0:
        raise ValueError(f"{name}_features is empty (N=0)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}_labels must be integer, got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name}_labels must be in [0, num_classes={num_classes}), got range [{low}, {high}]")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{name}_features has non-finite values")
    return features.astype(np.float32), labels.astype(np.int32)


def _check_pair(train_features, train_labels, test_features, test_labels, num_classes: int):
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    train = _check_split(train_features, train_labels, "train", num_classes)
    test = _check_split(test_features, test_labels, "test", num_classes)
    if train[0].shape[1] != test[0].shape[1]:
        raise ValueError(f"train_features and test_features must have the same D, got {train[0].shape[1]} "
                         f"and {test[0].shape[1]}")
    return train, test


# --------------------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------------------

def standardize_stats(features: np.ndarray, eps: float = STANDARDIZE_EPS) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], 1 / sqrt(var + eps) [D]) of [N, D] features (float64 sums): BatchNorm without affine, frozen."""
    features = np.asarray(features, np.float64)
    mean = features.mean(axis=0)
    return mean.astype(np.float32), (1.0 / np.sqrt(features.var(axis=0) + eps)).astype(np.float32)


def probe_objective(params: Mapping[str, jax.Array], features: jax.Array, labels: jax.Array,
                    weight_decay: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of `features @ kernel + bias` plus weight_decay / 2 * ||kernel||^2 (bias free).

    features: standardised [N, D]; labels int [N]; params {'kernel': [D, C], 'bias': [C]}. This is the objective
    `linear_probe` minimises (equal to scikit-learn's multinomial LogisticRegression with C = 1 / (N * wd)).
    """
    logits = features @ params["kernel"] + params["bias"]
    return jnp.mean(softmax_cross_entropy(logits, labels)) + 0.5 * weight_decay * jnp.sum(params["kernel"] ** 2)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "batch_size"))
def _fit_linear(features: jax.Array, labels: jax.Array, learning_rates: jax.Array, weight_decays: jax.Array,
                key: jax.Array, *, num_classes: int, steps: int, batch_size: int | None) -> dict[str, jax.Array]:
    """Adam with cosine decay from zero init, for every (learning rate, weight decay) pair at once (vmapped)."""
    n, dim = features.shape

    def batch(step):
        if batch_size is None:
            return features, labels
        # Uniform draws with replacement: O(batch) per step however large N is; one key per step.
        idx = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, n)
        return features[idx], labels[idx]

    def fit_one(learning_rate, weight_decay):
        params = {"kernel": jnp.zeros((dim, num_classes), jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}
        optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
        grad_fn = jax.grad(probe_objective)

        def step_fn(carry, step):
            params, opt_state = carry
            x, y = batch(step)
            updates, opt_state = optimizer.update(grad_fn(params, x, y, weight_decay), opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step_fn, (params, optimizer.init(params)), jnp.arange(steps))
        return params

    return jax.vmap(fit_one)(learning_rates, weight_decays)


@jax.jit
def _scores(params: dict[str, jax.Array], features: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(accuracy [configs], mean cross-entropy [configs]) of stacked classifiers; argmax ties -> lower class."""
    def one(p):
        logits = features @ p["kernel"] + p["bias"]
        return (jnp.mean(jnp.argmax(logits, -1) == labels), jnp.mean(softmax_cross_entropy(logits, labels)))
    return jax.vmap(one)(params)


def linear_probe(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any, *,
                 num_classes: int, learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
                 weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, steps: int = 300,
                 batch_size: int | None = None, holdout_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Multinomial logistic regression on frozen, standardised features (MAE-style linear probing).

    Features are standardised with the statistics of the features the classifier is fit on (BatchNorm without
    affine, eps 1e-6, as MAE's probe head). The classifier minimises `probe_objective` with Adam (cosine decay to
    0 over `steps`, zero init), full-batch by default or on `batch_size` examples drawn uniformly per step.

    Hyper-parameters: with more than one (learning_rate, weight_decay) pair, every pair is fit (vmapped) on a
    random (1 - holdout_fraction) part of the train features and scored on the held-out rest; the pair with the
    highest held-out accuracy wins, ties broken by the lower held-out cross-entropy. The winner is then refit on
    all train features, which gives the reported accuracies. With one pair there is no held-out split.
    Everything is deterministic given `seed` (split and mini-batch draws). Cost: (number of pairs) x steps passes
    over the fitting features, e.g. ~10 s on 2 CPU cores for 20k x 192 features and the default 8 pairs; pass
    `batch_size` (e.g. 1024-4096) for large N.

    Args:
      train_features: [N, D]; train_labels: int [N] in [0, num_classes); likewise test_*: [M, D], [M].

    Returns:
      dict with 'train_accuracy', 'test_accuracy', 'test_loss' (mean cross-entropy), 'learning_rate',
      'weight_decay' (chosen), 'sweep' (list of {'learning_rate', 'weight_decay', 'heldout_accuracy',
      'heldout_loss'}; empty without a sweep) and 'classifier' ({'mean', 'scale', 'kernel', 'bias'} numpy: logits
      = ((x - mean) * scale) @ kernel + bias).
    """
    (train_x, train_y), (test_x, test_y) = _check_pair(train_features, train_labels, test_features, test_labels,
                                                       num_classes)
    configs = list(itertools.product([float(v) for v in learning_rates], [float(v) for v in weight_decays]))
    if not configs:
        raise ValueError(f"learning_rates={learning_rates} and weight_decays={weight_decays} must be non-empty")
    for lr, wd in configs:
        if not lr > 0:
            raise ValueError(f"learning_rates must be positive, got {lr}")
        if not wd >= 0:
            raise ValueError(f"weight_decays must be >= 0, got {wd}")
    if not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive integer or None (full batch), got {batch_size!r}")
    n = len(train_x)
    num_heldout = int(round(holdout_fraction * n)) if 0 < holdout_fraction < 1 else -1
    if len(configs) > 1 and not 0 < num_heldout < n:
        raise ValueError(f"holdout_fraction={holdout_fraction} must leave at least one held-out and one fitting "
                         f"example of the {n} train features")
    key = jax.random.key(seed)

    def fit(x, y, pairs, fit_key):
        mean, scale = standardize_stats(x)
        bs = None if batch_size is None or batch_size >= len(x) else int(batch_size)
        params = _fit_linear(jnp.asarray((x - mean) * scale), jnp.asarray(y),
                             jnp.asarray([p[0] for p in pairs], jnp.float32),
                             jnp.asarray([p[1] for p in pairs], jnp.float32), fit_key,
                             num_classes=int(num_classes), steps=int(steps), batch_size=bs)
        return mean, scale, params

    sweep = []
    chosen = configs[0]
    if len(configs) > 1:
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), n))
        heldout, fitting = order[:num_heldout], order[num_heldout:]
        mean, scale, params = fit(train_x[fitting], train_y[fitting], configs, jax.random.fold_in(key, 1))
        accuracy, loss = (np.asarray(v) for v in _scores(
            params, jnp.asarray((train_x[heldout] - mean) * scale), jnp.asarray(train_y[heldout])))
        sweep = [{"learning_rate": lr, "weight_decay": wd, "heldout_accuracy": float(a), "heldout_loss": float(l)}
                 for (lr, wd), a, l in zip(configs, accuracy, loss)]
        best = min(range(len(configs)), key=lambda i: (-accuracy[i], loss[i], i))
        chosen = configs[best]
    mean, scale, params = fit(train_x, train_y, [chosen], jax.random.fold_in(key, 2))
    train_accuracy, _ = _scores(params, jnp.asarray((train_x - mean) * scale), jnp.asarray(train_y))
    test_accuracy, test_loss = _scores(params, jnp.asarray((test_x - mean) * scale), jnp.asarray(test_y))
    return {"train_accuracy": float(train_accuracy[0]), "test_accuracy": float(test_accuracy[0]),
            "test_loss": float(test_loss[0]), "learning_rate": chosen[0], "weight_decay": chosen[1],
            "sweep": sweep,
            "classifier": {"mean": mean, "scale": scale, "kernel": np.asarray(params["kernel"][0]),
                           "bias": np.asarray(params["bias"][0])}}


# --------------------------------------------------------------------------------------------------------------
# Weighted k-NN (DINO)
# --------------------------------------------------------------------------------------------------------------

def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "num_predictions"))
def _knn_chunk(queries: jax.Array, train: jax.Array, train_labels: jax.Array, temperature: jax.Array, *, k: int,
               num_classes: int, num_predictions: int) -> tuple[jax.Array, jax.Array]:
    """(vote fractions [c, C], ranked classes [c, num_predictions]) for normalised queries [c, D]."""
    sims = jnp.matmul(queries, train.T, precision=jax.lax.Precision.HIGHEST)  # [c, N_train]
    top_sims, top_idx = jax.lax.top_k(sims, k)  # Equal similarities: the lower train index first.
    # exp(sim / T) rescaled by exp(-max sim / T) per query so small temperatures cannot overflow; the scale
    # cancels in the vote fractions. (A max, not top_sims[:, :1]: slicing top_k's output makes XLA CPU replace
    # the TopK call by a full sort of every row, ~30x slower.)
    weights = jnp.exp((top_sims - jnp.max(top_sims, axis=1, keepdims=True)) / temperature)
    votes = jnp.sum(jax.nn.one_hot(train_labels[top_idx], num_classes) * weights[..., None], axis=1)
    votes = votes / jnp.sum(votes, axis=-1, keepdims=True)
    return votes, jax.lax.top_k(votes, num_predictions)[1]  # Equal votes: the lower class first.


def knn_classifier(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any, *, k: int = 20,
                   temperature: float = 0.07, num_classes: int, chunk_size: int = 256,
                   return_predictions: bool = False) -> dict[str, Any]:
    """DINO's weighted k-NN: cosine similarity of L2-normalised features, the k most similar train examples vote
    for their label with weight exp(similarity / temperature); classes are ranked by total vote.

    Test queries are processed `chunk_size` at a time (the last chunk padded), so memory is
    O(chunk_size * N_train). Ties are deterministic: among equal similarities the lower train index is a
    neighbour first; among equal votes the lower class ranks first.

    Args:
      train_features: [N, D]; train_labels: int [N] in [0, num_classes); test_*: [M, D], [M]; k <= N.

    Returns:
      dict with 'top1_accuracy' and, if num_classes >= 5, 'top5_accuracy'; with `return_predictions` also
      'predictions' int32 [M, min(5, num_classes)] (classes by decreasing vote) and 'votes' float32
      [M, num_classes] (each query's vote fractions, summing to 1).
    """
    (train_x, train_y), (test_x, test_y) = _check_pair(train_features, train_labels, test_features, test_labels,
                                                       num_classes)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= len(train_x):
        raise ValueError(f"k must be an integer in [1, N_train={len(train_x)}], got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    num_predictions = min(5, int(num_classes))
    train = _l2_normalize(jnp.asarray(train_x))
    train_labels_device = jnp.asarray(train_y)
    m = len(test_x)
    chunk = min(int(chunk_size), m)
    votes, predictions = [], []
    for start in range(0, m, chunk):
        queries = test_x[start:start + chunk]
        rows = len(queries)
        if rows < chunk:
            queries = np.concatenate([queries, np.zeros((chunk - rows, queries.shape[1]), np.float32)])
        chunk_votes, chunk_predictions = _knn_chunk(
            _l2_normalize(jnp.asarray(queries)), train, train_labels_device, jnp.float32(temperature), k=int(k),
            num_classes=int(num_classes), num_predictions=num_predictions)
        votes.append(np.asarray(chunk_votes)[:rows])
        predictions.append(np.asarray(chunk_predictions)[:rows])
    votes, predictions = np.concatenate(votes), np.concatenate(predictions).astype(np.int32)
    chex.assert_shape(predictions, (m, num_predictions))
    result = {"top1_accuracy": float(np.mean(predictions[:, 0] == test_y))}
    if num_classes >= 5:
        result["top5_accuracy"] = float(np.mean(np.any(predictions[:, :5] == test_y[:, None], axis=1)))
    if return_predictions:
        result["predictions"], result["votes"] = predictions, votes
    return result


# --------------------------------------------------------------------------------------------------------------
# Reconstruction quality
# --------------------------------------------------------------------------------------------------------------

def psnr(reconstruction: Any, target: Any, *, data_range: float,
         valid: Any = None) -> tuple[jax.Array, jax.Array]:
    """Peak signal-to-noise ratio 10 * log10(data_range^2 / MSE) per example, in dB, and their mean.

    reconstruction, target: [B, ...] (images [B, H, W, C] or patches [B, L, P]) on the same scale, e.g.
    data_range=1.0 for [0, 1] images or 255.0 for [0, 255] (uint8 works: computed in float32). The MSE of each
    example is over all its non-batch axes. Identical examples (MSE = 0) give +inf, and then the mean is +inf.
    valid: optional bool [B]; the mean is over the valid examples only (nan if there are none). Works under jit.

    Returns: (per-example PSNR float32 [B], mean float32 []).
    """
    if np.shape(reconstruction) != np.shape(target):
        raise ValueError(f"reconstruction and target must have the same shape, got {np.shape(reconstruction)} "
                         f"and {np.shape(target)}")
    if np.ndim(target) < 2:
        raise ValueError(f"reconstruction and target must be [B, ...] with rank >= 2, got shape {np.shape(target)}")
    if isinstance(data_range, (int, float, np.number)) and not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    batch = np.shape(target)[0]
    if valid is not None and (np.shape(valid) != (batch,)):
        raise ValueError(f"valid must be bool [{batch}], got shape {np.shape(valid)}")
    diff = jnp.asarray(reconstruction, jnp.float32) - jnp.asarray(target, jnp.float32)
    mse = jnp.mean(jnp.square(diff).reshape(batch, -1), axis=1)
    peak = jnp.square(jnp.asarray(data_range, jnp.float32))
    per_example = jnp.where(mse > 0, 10.0 * jnp.log10(peak / jnp.where(mse > 0, mse, 1.0)), jnp.inf)
    if valid is None:
        return per_example, jnp.mean(per_example)
    valid = jnp.asarray(valid, bool)
    mean = jnp.sum(jnp.where(valid, per_example, 0.0)) / jnp.sum(valid)
    return per_example, mean
