"""The MIM task: loss = masked-patch MSE of the model's prediction (numpy reference), reconstructions keep the
visible pixels, config errors are named before compute, and a short trainer run learns and writes its grid."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mae_builtin
from maskjax import masking
from maskjax.models.mae import patchify
from maskjax.tasks.mim import MIMTask
from maskjax.train import config as config_lib
from maskjax.train.trainer import Trainer
from tests.configs import override


def tiny_config(**overrides):
    c = mae_builtin.get_config("runlocal")
    c.progress_bar = False
    c.evals.eval.examples = 64
    c.evals.eval.batch_size = 32
    c.evals.reconstructions.count = 4
    c.data.num_threads = 0
    return override(c, **overrides)


def batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.uniform(-1, 1, (n, 32, 32, 3)), jnp.float32),
            "label": jnp.zeros((n,), jnp.int32), "valid": jnp.ones((n,), bool)}


@pytest.mark.parametrize("target", ["pixels", "norm_pixels"])
def test_loss_is_the_masked_patch_mse_of_the_prediction(target):
    task = MIMTask(tiny_config(mim__target=target))
    b = batch()
    params = nn.meta.unbox(task.init(jax.random.key(0), b))["params"]
    rng = jax.random.key(7)
    loss, metrics = task.loss(params, b, rng, train=False)
    # independent recomputation: the same masks (first of the three keys), the model's prediction, numpy MSE
    mask_rng = jax.random.split(rng, 3)[0]
    result = masking.random_masking(mask_rng, 4, (8, 8), 0.75)
    pred = np.asarray(task.model.apply({"params": params}, b["image"], result)[0], np.float64)
    patches = np.asarray(patchify(b["image"], 4), np.float64)
    if target == "norm_pixels":
        patches = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, keepdims=True, ddof=1) + 1e-6)
    mask = np.asarray(result.mask)
    want = ((pred - patches) ** 2).mean(-1)[mask].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["masked_fraction"]) == 0.75


@pytest.mark.parametrize("kind", ["cls", "gap"])
def test_probe_features_are_the_encoders_cls_token_or_patch_mean(kind):
    task = MIMTask(tiny_config())
    b = batch()
    params = nn.meta.unbox(task.init(jax.random.key(0), b))["params"]
    encoded = task.model.encoder.apply({"params": params["encoder"]}, b["image"])[1]["encoded"]
    want = encoded[:, 0] if kind == "cls" else encoded[:, task.model.encoder.num_prefix_tokens:].mean(1)
    np.testing.assert_allclose(task.features(params, b, kind), want, rtol=1e-6)


def test_reconstruction_keeps_visible_patches_and_psnr_matches_numpy():
    task = MIMTask(tiny_config())
    b = batch()
    params = nn.meta.unbox(task.init(jax.random.key(0), b))["params"]
    recon, mask = task.reconstruct(params, b["image"])
    got, want = np.asarray(patchify(recon, 4)), np.asarray(patchify(b["image"], 4))
    mask = np.asarray(mask)
    np.testing.assert_array_equal(got[~mask], want[~mask])
    assert np.abs(got[mask] - want[mask]).max() > 1e-3
    sums = task.eval_sums(params, b)
    mse = ((got - want) ** 2).mean(-1)
    per_image = np.array([mse[i][mask[i]].mean() for i in range(4)])
    np.testing.assert_allclose(float(sums["psnr"]) / 4, np.mean(10 * np.log10(4.0 / per_image)), rtol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (dict(mim__masking="attention", mim__masking_options={"scores": 1.0}), "config.mim.masking_options.scores"),
    (dict(mim__masking="blocky"), "config.mim.masking='blocky'"),
    (dict(mim__mask_ratio=1.0), "config.mim.mask_ratio=1.0"),
    (dict(model__mode="beit"), "model.mode='beit'"),
    (dict(mim__target="hog_features"), "mim.target='hog_features'"),
    (dict(model__decoder_width=30, model__decoder_heads=4), "model.decoder_width=30"),
    (dict(evals__probe__features="max"), "evals.probe.features='max'"),
    (dict(model__class_token=False), "evals.probe.features='cls': needs model.class_token=True"),
    (dict(model__attention__mask="window_2d"), "model.attention.mask='window_2d': cannot apply with model.mode='mae'"),
    (dict(model__num_classes=10), "Unknown config key 'model.num_classes'"),
    (dict(classification={"label_smoothing": 0.1}), "config.classification is the section of task 'classification'"),
])
def test_bad_mim_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.validate(tiny_config(**overrides), num_devices=8)


def test_masking_options_are_checked_against_the_strategy():
    c = tiny_config(mim__masking="block")
    c.mim.masking_options.min_num_patches = 4
    config_lib.validate(c, num_devices=8)
    c.mim.masking_options.min_num_pathces = 4
    with pytest.raises(ValueError, match=re.escape("min_num_pathces")):
        config_lib.validate(c, num_devices=8)
    c = tiny_config(mim__masking="grid")
    c.mim.masking_options.cell = 3  # 3 does not divide the 8 x 8 patch grid
    with pytest.raises(ValueError, match=re.escape("mim.masking_options={'cell': 3}")):
        config_lib.validate(c, num_devices=8)


def test_short_mae_run_lowers_the_loss_and_draws_reconstructions(tmp_path):
    trainer = Trainer(tiny_config(total_steps=30, evals__eval__every=0, checkpoint_every=30, data__train_examples=64,
                                  evals__probe__train_examples=64),
                      str(tmp_path))
    result = trainer.run()
    records = [r for r in map(__import__("json").loads, open(result.paths["metrics"])) if "train/loss" in r]
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert {"eval/loss", "eval/psnr"} <= set(result.eval_metrics)
    probes = {"probe/linear_accuracy", "probe/knn_accuracy", "probe/random_init_linear_accuracy",
              "probe/random_init_knn_accuracy"}
    assert probes <= set(result.eval_metrics)
    assert all(0.0 <= result.eval_metrics[k] <= 1.0 for k in probes)
    images = list((tmp_path / "images").iterdir())
    assert [p.name for p in images] == ["reconstructions_step000030.png"]


def test_hog_target_trains_a_model_with_matching_output():
    from maskjax.models.mae import hog_features
    task = MIMTask(tiny_config(mim__target="hog"))
    b = batch()
    params = nn.meta.unbox(task.init(jax.random.key(0), b))["params"]
    assert params["decoder_pred"]["kernel"].shape[-1] == 27  # 9 bins x 3 channels, one cell per 4x4 patch
    rng = jax.random.key(3)
    loss, _ = task.loss(params, b, rng, train=False)
    result = masking.random_masking(jax.random.split(rng, 3)[0], 4, (8, 8), 0.75)
    pred = np.asarray(task._model(b["image"]).apply({"params": params}, b["image"], result)[0])
    target = np.asarray(hog_features(b["image"], 4))
    mask = np.asarray(result.mask)
    np.testing.assert_allclose(float(loss), ((pred - target) ** 2).mean(-1)[mask].mean(), rtol=1e-5)
    assert set(task.summarize(task.eval_sums(params, b))) == {"loss"}


def test_masksub_adds_the_kl_of_a_masked_branch_to_the_main_prediction():
    from configs import vit_builtin
    from maskjax.tasks.classification import PURPOSE_MASKSUB, ClassificationTask
    c = vit_builtin.get_config("runlocal")
    c.model.drop_path_rate = 0.0
    plain = ClassificationTask(c.copy_and_resolve_references())
    c.classification.masksub_ratio = 0.5
    task = ClassificationTask(c)
    b = {"image": batch()["image"], "label": jnp.array([0, 1, 2, 3])}
    params = nn.meta.unbox(task.init(jax.random.key(0), b))["params"]
    params["head"]["kernel"] = jax.random.normal(jax.random.key(1), params["head"]["kernel"].shape)  # non-zero head
    rng = jax.random.key(4)
    loss, metrics = task.loss(params, b, rng, train=True)
    base, _ = plain.loss(params, b, rng, train=True)
    # independent recomputation: main logits, the sub-branch on the kept half, KL in numpy
    main = np.asarray(task.model.apply({"params": params}, b["image"])[0], np.float64)
    kept = masking.random_masking(jax.random.split(jax.random.fold_in(rng, PURPOSE_MASKSUB), 3)[0], 4, (8, 8),
                                  0.5).ids_keep
    assert kept.shape == (4, 32)
    sub = np.asarray(task.model.apply({"params": params}, b["image"], ids_keep=kept)[0], np.float64)
    p = np.exp(main - main.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    log_q = sub - sub.max(1, keepdims=True); log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
    kl = np.mean(np.sum(p * (np.log(p) - log_q), axis=1))
    assert kl > 1e-4
    np.testing.assert_allclose(float(metrics["masksub_loss"]), kl, rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(base) + kl, rtol=1e-5)
    assert "masksub_loss" not in task.loss(params, b, rng, train=False)[1]  # evaluation: main branch only
