"""Representation evaluation: feature extraction over padded eval batches, the linear probe against an
independent scipy L-BFGS logistic regression, weighted k-NN against a brute-force numpy k-NN, and PSNR against
its closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from maskjax.data.pipeline import EvalLoader
from maskjax.evaluate import probe as P


# ------------------------------------------------------------------------------------------------ references

def _np_standardize(x):
    x = np.asarray(x, np.float64)
    return (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-6)


def _lbfgs_logistic(x, y, num_classes, weight_decay):
    """Multinomial logistic regression: argmin mean CE + wd/2 ||W||^2 (bias free) with scipy L-BFGS, float64."""
    n, d = x.shape
    onehot = np.eye(num_classes)[y]

    def objective(theta):
        w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
        z = x @ w + b
        lse = scipy.special.logsumexp(z, axis=1)
        g = (np.exp(z - lse[:, None]) - onehot) / n
        value = np.mean(lse - z[np.arange(n), y]) + 0.5 * weight_decay * np.sum(w ** 2)
        return value, np.concatenate([(x.T @ g + weight_decay * w).ravel(), g.sum(0)])

    result = scipy.optimize.minimize(objective, np.zeros(d * num_classes + num_classes), jac=True,
                                     method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-10})
    w, b = result.x[:d * num_classes].reshape(d, num_classes), result.x[d * num_classes:]
    return w, b, objective


def _np_knn(train_x, train_y, test_x, k, temperature, num_classes):
    """Brute force, float64: exp(sim / T) weights of the k most similar (stable order: lower index first)."""
    norm = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    sims = norm(np.asarray(test_x, np.float64)) @ norm(np.asarray(train_x, np.float64)).T
    votes = np.zeros((len(test_x), num_classes))
    for i in range(len(test_x)):
        neighbours = np.argsort(-sims[i], kind="stable")[:k]
        for j in neighbours:
            votes[i, train_y[j]] += np.exp(sims[i, j] / temperature)
    votes /= votes.sum(1, keepdims=True)
    ranked = np.stack([np.argsort(-v, kind="stable") for v in votes])
    return votes, ranked[:, :min(5, num_classes)]


def _blobs(seed, n, d, num_classes, spread):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, d)) * spread
    y = rng.integers(0, num_classes, n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y.astype(np.int32)


def _split(x, y, n_train):
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# ------------------------------------------------------------------------------------------- extract_features

def _feature_fn(params, images):
    return jnp.tanh(images.reshape(images.shape[0], -1) @ params["w"]) * params["s"]


def _np_features(params, images):
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    return np.tanh(flat @ np.asarray(params["w"], np.float64)) * float(params["s"])


def test_extract_features_drops_eval_loader_padding():
    rng = np.random.default_rng(0)
    source = [{"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": np.int32(i % 7)}
              for i in range(23)]
    params = {"w": jnp.asarray(rng.normal(size=(8 * 8 * 3, 6)) * 0.05, jnp.float32), "s": jnp.float32(2.0)}
    loader = EvalLoader(source, global_batch_size=10, image_size=8)  # 3 batches, the last with 7 padding rows.
    features, labels = P.extract_features(_feature_fn, params, loader)
    images = np.stack([e["image"] for e in source]).astype(np.float64) / 127.5 - 1.0
    assert features.dtype == np.float32 and features.shape == (23, 6)
    np.testing.assert_allclose(features, _np_features(params, images), atol=1e-5)
    np.testing.assert_array_equal(labels, [e["label"] for e in source])


def test_extract_features_of_a_vit_then_probes():
    """The intended use: pre-logits of a (tiny, random) maskjax ViT over a padded EvalLoader."""
    from maskjax.models.vit import ViT

    rng = np.random.default_rng(2)
    source = [{"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": np.int32(i % 3)}
              for i in range(19)]
    model = ViT(num_classes=None, patch_size=4, width=16, depth=1, mlp_dim=32, num_heads=2)
    # Random parameters of the right structure without compiling `init` (slow for a ViT on a busy CPU).
    shapes = jax.eval_shape(lambda key: model.init(key, jnp.zeros((1, 8, 8, 3)), train=False), jax.random.key(0))
    leaves, treedef = jax.tree.flatten(shapes)
    variables = jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=l.shape) * 0.3, l.dtype) for l in leaves])
    feature_fn = lambda v, images: model.apply(v, images, train=False)[1]["pre_logits"]
    features, labels = P.extract_features(feature_fn, variables, EvalLoader(source, global_batch_size=8,
                                                                            image_size=8))
    images = np.stack([e["image"] for e in source]).astype(np.float32) / 127.5 - 1.0
    direct = jax.jit(feature_fn)(variables, jnp.asarray(images))  # One unpadded batch of all 19.
    np.testing.assert_allclose(features, direct, atol=1e-5)
    knn = P.knn_classifier(features, labels, features, labels, k=1, num_classes=3)
    assert knn["top1_accuracy"] == 1.0  # Every example is its own nearest neighbour (random features distinct).
    probe = P.linear_probe(features, labels, features, labels, num_classes=3, learning_rates=(0.1,),
                           weight_decays=(0.0,))
    assert probe["train_accuracy"] == probe["test_accuracy"]


@pytest.mark.parametrize("as_dict", [False, True])
def test_extract_features_whole_arrays(as_dict):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(13, 4, 4, 2)).astype(np.float32)
    labels = rng.integers(0, 3, 13)
    params = {"w": jnp.asarray(rng.normal(size=(32, 5)), jnp.float32), "s": jnp.float32(1.0)}
    data = {"image": images, "label": labels} if as_dict else (images, labels)
    features, out_labels = P.extract_features(_feature_fn, params, data, batch_size=5)
    np.testing.assert_allclose(features, _np_features(params, images), atol=1e-5)
    np.testing.assert_array_equal(out_labels, labels)


def test_extract_features_bad_inputs():
    params = {"w": jnp.ones((32, 5)), "s": jnp.float32(1.0)}
    images, labels = np.zeros((4, 4, 4, 2), np.float32), np.zeros((4,), np.int32)
    with pytest.raises(ValueError, match="apply_fn"):
        P.extract_features(lambda p, x: x, params, (images, labels))  # [b, H, W, C] is not [b, D].
    with pytest.raises(ValueError, match="labels"):
        P.extract_features(_feature_fn, params, (images, labels[:3]))
    with pytest.raises(ValueError, match="'valid'"):
        P.extract_features(_feature_fn, params, [{"image": images, "label": labels, "valid": np.ones(3, bool)}])
    with pytest.raises(ValueError, match="no batches"):
        P.extract_features(_feature_fn, params, [])


# ------------------------------------------------------------------------------------------------ linear probe

def test_linear_probe_separable_blobs_near_perfect():
    x, y = _blobs(0, 1200, 16, 4, spread=4.0)
    out = P.linear_probe(*_split(x, y, 800), num_classes=4)
    assert out["train_accuracy"] >= 0.995 and out["test_accuracy"] >= 0.99, out
    assert len(out["sweep"]) == len(P.DEFAULT_LEARNING_RATES) * len(P.DEFAULT_WEIGHT_DECAYS)


def test_linear_probe_random_labels_at_chance():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 32)).astype(np.float32)
    y = rng.integers(0, 4, 2000)
    out = P.linear_probe(*_split(x, y, 1000), num_classes=4)
    # 1000 test labels at chance 0.25: binomial sd 0.014; 0.06 is > 4 sd.
    assert abs(out["test_accuracy"] - 0.25) < 0.06, out


@pytest.mark.parametrize("weight_decay", [1e-3, 1e-2])
def test_linear_probe_matches_lbfgs_reference(weight_decay):
    x, y = _blobs(4, 2000, 24, 5, spread=0.35)  # Overlapping classes: accuracy well below 1.
    train_x, train_y, test_x, test_y = _split(x, y, 1400)
    out = P.linear_probe(train_x, train_y, test_x, test_y, num_classes=5, learning_rates=(0.1,),
                         weight_decays=(weight_decay,))
    assert out["sweep"] == [] and out["weight_decay"] == weight_decay
    w, b, objective = _lbfgs_logistic(_np_standardize(train_x), train_y, 5, weight_decay)
    classifier = out["classifier"]
    ours = np.concatenate([np.asarray(classifier["kernel"], np.float64).ravel(), classifier["bias"]])
    reference_min = objective(np.concatenate([w.ravel(), b]))[0]
    assert objective(ours)[0] == pytest.approx(reference_min, rel=1e-4)
    # The reference's own standardisation (train statistics) and predictions.
    train64 = np.asarray(train_x, np.float64)
    test_std = (test_x - train64.mean(0)) / np.sqrt(train64.var(0) + 1e-6)
    reference_test = np.mean(np.argmax(test_std @ w + b, 1) == test_y)
    reference_train = np.mean(np.argmax(_np_standardize(train_x) @ w + b, 1) == train_y)
    assert 0.4 < reference_test < 0.95  # The comparison is not trivially at 0 or 1.
    assert out["test_accuracy"] == pytest.approx(reference_test, abs=0.02)
    assert out["train_accuracy"] == pytest.approx(reference_train, abs=0.02)
    # The returned classifier applies as documented.
    ours_test = np.argmax((test_x - classifier["mean"]) * classifier["scale"] @ classifier["kernel"]
                          + classifier["bias"], 1)
    assert np.mean(ours_test == test_y) == pytest.approx(out["test_accuracy"], abs=1e-6)


def test_linear_probe_minibatch_close_to_optimum_and_deterministic():
    x, y = _blobs(5, 1500, 16, 3, spread=0.4)
    kwargs = dict(num_classes=3, learning_rates=(0.05,), weight_decays=(1e-2,), batch_size=128, steps=400)
    first = P.linear_probe(*_split(x, y, 1000), seed=7, **kwargs)
    again = P.linear_probe(*_split(x, y, 1000), seed=7, **kwargs)
    other = P.linear_probe(*_split(x, y, 1000), seed=8, **kwargs)
    np.testing.assert_array_equal(first["classifier"]["kernel"], again["classifier"]["kernel"])
    assert not np.array_equal(first["classifier"]["kernel"], other["classifier"]["kernel"])
    w, b, objective = _lbfgs_logistic(_np_standardize(x[:1000]), y[:1000], 3, 1e-2)
    ours = np.concatenate([np.asarray(first["classifier"]["kernel"], np.float64).ravel(), first["classifier"]["bias"]])
    assert objective(ours)[0] == pytest.approx(objective(np.concatenate([w.ravel(), b]))[0], rel=2e-2)


def test_linear_probe_sweep_prefers_weak_regularisation_on_learnable_data():
    # A huge weight decay shrinks the classifier to near-constant logits: held-out accuracy must reject it.
    x, y = _blobs(6, 1000, 16, 4, spread=0.8)
    out = P.linear_probe(*_split(x, y, 700), num_classes=4, learning_rates=(0.1,), weight_decays=(30.0, 1e-3))
    assert out["weight_decay"] == 1e-3, out["sweep"]
    assert [s["weight_decay"] for s in out["sweep"]] == [30.0, 1e-3]
    assert out["sweep"][1]["heldout_accuracy"] > out["sweep"][0]["heldout_accuracy"]


# ---------------------------------------------------------------------------------------------------- k-NN

@pytest.mark.parametrize("k,num_classes,temperature,chunk", [(20, 10, 0.07, 64), (1, 3, 0.07, 1000), (7, 4, 0.005, 17)])
def test_knn_matches_brute_force(k, num_classes, temperature, chunk):
    rng = np.random.default_rng(k)
    train_x, test_x = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(150, 16)).astype(np.float32)
    train_y, test_y = rng.integers(0, num_classes, 300), rng.integers(0, num_classes, 150)
    out = P.knn_classifier(train_x, train_y, test_x, test_y, k=k, temperature=temperature,
                           num_classes=num_classes, chunk_size=chunk, return_predictions=True)
    votes, ranked = _np_knn(train_x, train_y, test_x, k, temperature, num_classes)
    assert np.all(np.isfinite(out["votes"]))
    np.testing.assert_allclose(out["votes"], votes, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(out["predictions"], ranked)
    assert out["top1_accuracy"] == np.mean(ranked[:, 0] == test_y)
    if num_classes >= 5:
        assert out["top5_accuracy"] == np.mean(np.any(ranked == test_y[:, None], 1))
    else:
        assert "top5_accuracy" not in out


def test_knn_ties_are_deterministic():
    # Axis vectors scaled by powers of two (normalised exactly): similarities are exactly 0 or 1, so neighbours
    # tie in similarity and classes tie in (integer) votes; the brute force resolves both by the lower index.
    rng = np.random.default_rng(9)
    directions, num_classes, k = 16, 5, 4
    train_dirs = np.concatenate([np.repeat(np.arange(directions), 5), rng.integers(0, directions, 40)])
    train_x = np.eye(directions, dtype=np.float32)[train_dirs] * rng.choice([0.5, 1.0, 4.0], (len(train_dirs), 1))
    train_y = rng.integers(0, num_classes, len(train_dirs))
    test_dirs = rng.integers(0, directions, 100)
    test_x = np.eye(directions, dtype=np.float32)[test_dirs] * 3.0
    test_y = rng.integers(0, num_classes, 100)
    out = P.knn_classifier(train_x, train_y, test_x, test_y, k=k, num_classes=num_classes, chunk_size=16,
                           return_predictions=True)
    votes, ranked = _np_knn(train_x.astype(np.float64), train_y, test_x, k, 0.07, num_classes)
    assert np.any(np.sort(votes, 1)[:, -1] == np.sort(votes, 1)[:, -2])  # The case really has tied votes.
    np.testing.assert_allclose(out["votes"], votes, rtol=1e-6)
    np.testing.assert_array_equal(out["predictions"], ranked)


# ---------------------------------------------------------------------------------------------------- PSNR

def _np_psnr(x, y, data_range):
    mse = np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2, axis=tuple(range(1, np.ndim(x))))
    return 10 * np.log10(data_range ** 2 / mse)


def test_psnr_closed_form_unit_range_and_jit():
    rng = np.random.default_rng(0)
    target = rng.uniform(size=(6, 8, 8, 3)).astype(np.float32)
    recon = np.clip(target + rng.normal(scale=0.05, size=target.shape), 0, 1).astype(np.float32)
    per_image, mean = P.psnr(recon, target, data_range=1.0)
    expected = _np_psnr(recon, target, 1.0)
    np.testing.assert_allclose(per_image, expected, rtol=1e-5)
    assert float(mean) == pytest.approx(expected.mean(), rel=1e-5)
    jitted = jax.jit(lambda a, b: P.psnr(a, b, data_range=1.0))(recon, target)
    np.testing.assert_allclose(jitted[0], expected, rtol=1e-5)


def test_psnr_uint8_identical_and_valid():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 256, (4, 5, 5, 1), dtype=np.uint8)
    recon = target.copy()
    recon[1:] = np.clip(target[1:].astype(int) + rng.integers(-20, 21, target[1:].shape), 0, 255).astype(np.uint8)
    per_image, mean = P.psnr(recon, target, data_range=255.0)
    assert np.isposinf(per_image[0]) and np.isposinf(mean)  # Identical image -> +inf, documented.
    np.testing.assert_allclose(per_image[1:], _np_psnr(recon[1:], target[1:], 255.0), rtol=1e-5)  # No uint8 wrap.
    _, valid_mean = P.psnr(recon, target, data_range=255.0, valid=np.array([False, True, True, False]))
    assert float(valid_mean) == pytest.approx(_np_psnr(recon[1:3], target[1:3], 255.0).mean(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ bad inputs

def _good():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(20, 4)).astype(np.float32), np.arange(20) % 3,
            rng.normal(size=(10, 4)).astype(np.float32), np.arange(10) % 3)


@pytest.mark.parametrize("fn", [P.linear_probe, P.knn_classifier])
@pytest.mark.parametrize("change,match", [
    (lambda a: (a[0], a[1][:-1], a[2], a[3]), "train_labels"),
    (lambda a: (a[0][None], a[1], a[2], a[3]), "train_features"),
    (lambda a: (a[0], a[1], a[2][:, :3], a[3]), "same D"),
    (lambda a: (a[0], a[1], a[2], a[3] + 3), "test_labels.*num_classes=3"),
    (lambda a: (a[0], a[1].astype(np.float32), a[2], a[3]), "train_labels must be integer"),
    (lambda a: (np.where(np.arange(20)[:, None] == 0, np.nan, a[0]), a[1], a[2], a[3]), "non-finite"),
])
def test_bad_inputs_raise_value_error(fn, change, match):
    with pytest.raises(ValueError, match=match):
        fn(*change(_good()), num_classes=3)


def test_bad_arguments_raise_value_error():
    args = _good()
    with pytest.raises(ValueError, match="k must be .* N_train=20.*21"):
        P.knn_classifier(*args, k=21, num_classes=3)
    with pytest.raises(ValueError, match="temperature"):
        P.knn_classifier(*args, k=3, temperature=0.0, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        P.linear_probe(*args, num_classes=1)
    with pytest.raises(ValueError, match="holdout_fraction"):
        P.linear_probe(*args, num_classes=3, holdout_fraction=0.0)
    with pytest.raises(ValueError, match="weight_decays"):
        P.linear_probe(*args, num_classes=3, weight_decays=(-1.0,))
    with pytest.raises(ValueError, match="same shape"):
        P.psnr(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)), data_range=1.0)
    with pytest.raises(ValueError, match="rank >= 2"):
        P.psnr(np.zeros(3), np.zeros(3), data_range=1.0)
    with pytest.raises(ValueError, match="data_range"):
        P.psnr(np.zeros((2, 3)), np.zeros((2, 3)), data_range=0)
