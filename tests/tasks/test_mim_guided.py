"""Score-guided masking in the MIM task (AttMask, Hard Patches Mining) and teacher-feature targets, each against an
independent recomputation: attention weights from the captured query/key projections (numpy softmax), HPM's
pairwise ranking loss by a double loop, teacher targets from the checkpoint restored by orbax directly."""

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mae_builtin, vit_builtin
from maskjax import masking
from maskjax.models.mae import ranking_loss
from maskjax.models.vit import token_attention_scores
from maskjax.tasks.classification import vit_from_config
from maskjax.tasks.mim import MIMTask
from maskjax.train import checkpoint as ckpt_lib
from maskjax.train import config as config_lib
from maskjax.train.trainer import Trainer
from tests.configs import override

load_params = ckpt_lib.load_params


def tiny_config(**overrides):
    c = mae_builtin.get_config("runlocal")
    c.progress_bar, c.data.num_threads = False, 0
    c.evals.eval.examples, c.evals.eval.batch_size = 64, 32
    for name in ("probe", "reconstructions", "predictions"):
        if name in c.evals:
            c.evals[name].every = -1
    return override(c, **overrides)


def images(n=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)), jnp.float32)


def init_params(task, x):
    return nn.meta.unbox(task.init(jax.random.key(0), {"image": x}))["params"]


def numpy_attention(model, params, x):
    """The last block's head-mean softmax(q k^T / sqrt(d)) [B, T, T], from the captured query/key projections."""
    last = f"block_{model.depth - 1}"
    _, state = model.apply({"params": params}, x, train=False, capture_intermediates=True)
    attn = state["intermediates"]["encoder"][last]["attn"]
    q, k = (np.asarray(attn[name]["__call__"][0], np.float64) for name in ("query", "key"))  # [B, T, H, D]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)).mean(1)


def numpy_cls_attention(model, params, x):
    return numpy_attention(model, params, x)[:, 0, model.num_prefix_tokens:]


@pytest.mark.parametrize("class_token", [True, False])
def test_token_attention_scores_match_a_numpy_softmax(class_token):
    model = vit_from_config(tiny_config(model__class_token=class_token).model)
    x = images()
    params = nn.meta.unbox(model.init(jax.random.key(1), x))["params"]
    got = np.asarray(token_attention_scores(model, params, x))
    weights, p = numpy_attention(model, params, x), model.num_prefix_tokens
    want = weights[:, 0, p:] if class_token else weights[:, p:, p:].mean(1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert got.shape == (4, 64)


def test_attmask_masks_the_patches_the_cls_token_attends_to_most():
    task = MIMTask(tiny_config(mim__masking="attention", mim__mask_ratio=0.25))
    x = images()
    params = init_params(task, x)
    params = jax.tree.map(lambda a: a * 3.0, params)  # sharper attention: no near-ties among the top scores
    masks = task.train_masking(params, x, jax.random.key(3))
    scores = numpy_cls_attention(task.model.encoder, params["encoder"], x)
    num_masked = 16  # round(0.25 * 64)
    for row in range(4):
        want = set(np.argsort(-scores[row])[:num_masked])
        assert set(np.flatnonzero(np.asarray(masks.mask[row]))) == want
    low = MIMTask(tiny_config(mim__masking="attention", mim__mask_ratio=0.25,
                              mim__masking_options={"mode": "low"})).train_masking(params, x, jax.random.key(3))
    for row in range(4):  # AttMask-Low: every masked patch scores at most every visible one (float32 ties aside)
        hidden = np.asarray(low.mask[row])
        assert hidden.sum() == num_masked
        assert scores[row][hidden].max() <= scores[row][~hidden].min() + 1e-6


def test_ranking_loss_matches_a_double_loop():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 7)), rng.normal(size=(2, 7))
    target[0, 3] = target[0, 5]  # a tie: that pair is not counted
    mask = rng.uniform(size=(2, 7)) < 0.6
    mask[:, :2] = True
    total, count = 0.0, 0
    for b in range(2):
        for i in range(7):
            for j in range(7):
                if not (mask[b, i] and mask[b, j]) or target[b, i] == target[b, j]:
                    continue
                p = 1.0 / (1.0 + np.exp(-(pred[b, i] - pred[b, j])))
                total += -np.log(p) if target[b, i] > target[b, j] else -np.log(1.0 - p)
                count += 1
    got = ranking_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), total / count, rtol=1e-5)


def test_hard_patch_masks_the_predicted_hardest_patches_and_trains_the_predictor():
    c = tiny_config(mim__masking="hard_patch", mim__mask_ratio=0.5, total_steps=10, mim__hard_patch_alpha_max=0.5)
    task = MIMTask(c)
    x = images()
    params = init_params(task, x)
    # predicted losses on the whole image, from a hand-built "nothing masked" split
    order = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (4, 64))
    whole = masking.MaskingResult(mask=jnp.zeros((4, 64), bool), ids_keep=order,
                                  ids_masked=jnp.zeros((4, 0), jnp.int32), ids_restore=order)
    predicted = np.asarray(task.model.apply({"params": params}, x, whole)[1]["loss_pred"])
    for step, num_hard in ((9, 16), (4, 8)):  # alpha = (step + 1) / 10 * 0.5 of 32 masked patches
        np.testing.assert_allclose(float(task.hard_fraction(step)), (step + 1) / 10 * 0.5, rtol=1e-6)
        masks = task.train_masking(params, x, jax.random.key(step), step)
        assert np.asarray(masks.mask).sum(1).tolist() == [32] * 4
        for row in range(4):
            hardest = np.argsort(-predicted[row])[:num_hard]
            assert np.asarray(masks.mask[row])[hardest].all()
    # the total loss is reconstruction + weight * ranking loss, and the predictor head gets gradients
    loss, metrics = task.loss(params, {"image": x}, jax.random.key(5), train=False, step=jnp.int32(9))
    np.testing.assert_allclose(float(loss), float(metrics["reconstruction_loss"] + metrics["loss_predictor"]),
                               rtol=1e-6)
    grads = jax.grad(lambda p: task.loss(p, {"image": x}, jax.random.key(5), False, 9)[0])(params)
    assert float(jnp.abs(grads["decoder_loss_pred"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("strategy", ["attention", "hard_patch"])
def test_guided_strategies_train_through_the_trainer(tmp_path, strategy):
    c = tiny_config(mim__masking=strategy, total_steps=6, log_every=1, evals__eval__every=6, checkpoint_every=6,
                    optimizer__warmup_steps=1, async_checkpointing=False)
    result = Trainer(c, str(tmp_path)).run()
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 6 and np.all(np.isfinite(losses))
    assert result.step == 6 and np.isfinite(result.eval_metrics["eval/loss"])
    if strategy == "hard_patch":  # the easy-to-hard schedule is visible in the logged metric
        fractions = [r["train/hard_fraction"] for r in records if "train/hard_fraction" in r]
        np.testing.assert_allclose(fractions, [(s + 1) / 6 * 0.5 for s in range(6)], rtol=1e-5)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny supervised ViT run (2 steps) whose checkpoint serves as the teacher."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    c = vit_builtin.get_config("runlocal")
    c.progress_bar, c.data.num_threads = False, 0
    c = override(c, total_steps=2, checkpoint_every=2, evals__eval__every=0, evals__eval__examples=32,
                 evals__eval__batch_size=32, evals__predictions__every=-1, optimizer__warmup_steps=1,
                 async_checkpointing=False, model__width=48, model__num_heads=3)
    Trainer(c, workdir).run()
    return workdir, c


def test_teacher_targets_are_the_normalised_features_of_the_checkpoint(teacher_run):
    workdir, teacher_config = teacher_run
    task = MIMTask(tiny_config(mim__target="teacher", mim__teacher__workdir=workdir), load_params=load_params)
    x = images()
    params = init_params(task, x)
    rng = jax.random.key(2)
    loss, _ = task.loss(params, {"image": x}, rng, train=False)
    # independent: restore the checkpoint with orbax, run the teacher's ViT, normalise with numpy
    source = ckpt_lib.Checkpointer(workdir, async_save=False)
    teacher_params = source.restore_params(2)
    source.close()
    teacher = vit_from_config(teacher_config.model)
    encoded = np.asarray(teacher.apply({"params": teacher_params}, x)[1]["encoded"], np.float64)[:, 1:]
    target = (encoded - encoded.mean(-1, keepdims=True)) / np.sqrt(encoded.var(-1, keepdims=True) + 1e-6)
    result = masking.random_masking(jax.random.split(rng, 3)[0], 4, (8, 8), 0.75)
    pred = np.asarray(task._model(x).apply({"params": params}, x, result)[0], np.float64)
    assert pred.shape == (4, 64, 48)
    mask = np.asarray(result.mask)
    np.testing.assert_allclose(float(loss), ((pred - target) ** 2).mean(-1)[mask].mean(), rtol=1e-4)


def test_attmask_can_take_the_teachers_attention(teacher_run):
    workdir, teacher_config = teacher_run
    task = MIMTask(tiny_config(mim__masking="attention", mim__attention_scores="teacher",
                               mim__teacher__workdir=workdir, mim__mask_ratio=0.25), load_params=load_params)
    x = images()
    source = ckpt_lib.Checkpointer(workdir, async_save=False)
    teacher_params = source.restore_params(2)
    source.close()
    teacher = vit_from_config(teacher_config.model)
    scores = numpy_cls_attention(teacher, teacher_params, x)
    masks = task.train_masking(init_params(task, x), x, jax.random.key(0))
    hits = [len(set(np.flatnonzero(np.asarray(masks.mask[r]))) & set(np.argsort(-scores[r])[:16]))
            for r in range(4)]
    assert min(hits) >= 15  # a 2-step teacher attends almost uniformly: allow one near-tie per row


@pytest.mark.parametrize("overrides, message", [
    (dict(mim__masking="hard_patch", mim__masking_options={"alpha": 0.3}), "mim.masking_options.alpha"),
    (dict(mim__masking="attention", mim__attention_scores="ema"), "mim.attention_scores"),
    (dict(mim__target="teacher"), "mim.teacher.workdir"),
    (dict(mim__masking="hard_patch", mim__hard_patch_alpha_max=1.5), "mim.hard_patch_alpha_max"),
])
def test_bad_guided_settings_are_named_before_compute(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.validate(tiny_config(**overrides), num_devices=1)


def test_teacher_with_another_patch_grid_is_refused(tmp_path, teacher_run):
    workdir, _ = teacher_run
    with pytest.raises(ValueError, match=re.escape("patch grid (8, 8) differs from the student's (4, 4)")):
        MIMTask(tiny_config(mim__target="teacher", mim__teacher__workdir=workdir, model__variant="mu/8"),
                load_params=load_params)
    with pytest.raises(ValueError, match="no config.json"):
        MIMTask(tiny_config(mim__target="teacher", mim__teacher__workdir=str(tmp_path)), load_params=load_params)
    with pytest.raises(ValueError, match="needs `load_params`"):
        MIMTask(tiny_config(mim__target="teacher", mim__teacher__workdir=workdir))
