"""Tokenizer and MaskGIT tasks: losses and metrics against numpy, the tied head and token layout, label dropout,
sampling, errors named before compute, and short trainer runs (tokenizer, then MaskGIT on its tokens)."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import maskgit_builtin, tokenizer_builtin
from maskjax.models.maskgit import check_tokens
from maskjax.tasks.maskgit import MaskGITTask
from maskjax.tasks.tokenizer import TokenizerTask
from maskjax.train import config as config_lib
from maskjax.train.checkpoint import load_params
from maskjax.train.trainer import Trainer
from tests.configs import override


def tokenizer_config(**overrides):
    c = tokenizer_builtin.get_config("runlocal")
    c.progress_bar, c.data.num_threads, c.async_checkpointing = False, 0, False
    c.model.filters, c.model.embedding_dim, c.model.norm_groups = 8, 8, 4
    c.model.fsq_levels = (4, 4, 3)  # 48 codes
    c.evals.eval.examples, c.evals.eval.batch_size, c.evals.reconstructions.count = 64, 32, 4
    return override(c, **overrides)


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    """A tiny FSQ tokenizer trained for 40 steps; its workdir feeds the MaskGIT tests."""
    workdir = str(tmp_path_factory.mktemp("tokenizer"))
    c = tokenizer_config(total_steps=40, checkpoint_every=40, evals__eval__every=0, log_every=5,
                         optimizer__learning_rate=3e-3)
    result = Trainer(c, workdir).run()
    return workdir, c, result


def maskgit_config(tokenizer_workdir, **overrides):
    c = maskgit_builtin.get_config(f"runlocal,tokenizer={tokenizer_workdir}")
    c.progress_bar, c.data.num_threads, c.async_checkpointing = False, 0, False
    c.model.dropout = 0.0
    c.evals.eval.examples, c.evals.eval.batch_size, c.evals.samples.count = 64, 32, 3
    return override(c, **overrides)


def images(n=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)), jnp.float32)


def maskgit_task(tokenizer_workdir, **overrides):
    config = maskgit_config(tokenizer_workdir, **overrides)
    config_lib.validate(config, 1)
    return MaskGITTask(config, load_params=load_params)


# ------------------------------------------------------------------------------------------------ tokenizer task
def test_tokenizer_run_learns_and_draws_reconstructions(tokenizer_run):
    workdir, _, _ = tokenizer_run
    import json
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    assert any(name.startswith("reconstructions") for name in os.listdir(os.path.join(workdir, "images")))
    final = [r for r in records if "eval/psnr" in r][-1]
    assert 0 < final["eval/codebook_usage"] <= 1 and final["eval/codebook_size"] == 48


def test_tokenizer_metrics_match_numpy(tokenizer_run):
    workdir, config, _ = tokenizer_run
    task = TokenizerTask(config)
    params, _ = load_params(workdir)
    x = images(6)
    batch = {"image": x, "valid": jnp.asarray([True] * 5 + [False])}
    sums = jax.device_get(task.eval_sums(params, batch))
    reconstruction, aux = task.model.apply({"params": params}, x)
    ids = np.asarray(aux["ids"])[:5].reshape(-1)
    counts = np.bincount(ids, minlength=48)
    np.testing.assert_array_equal(np.asarray(sums["code_counts"]), counts)
    metrics = task.summarize(sums)
    p = counts[counts > 0] / counts.sum()
    assert metrics["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert metrics["codebook_usage"] == pytest.approx((counts > 0).mean())
    mse = ((np.asarray(reconstruction) - np.asarray(x)) ** 2).mean(axis=(1, 2, 3))[:5]
    assert metrics["psnr"] == pytest.approx(np.mean(10 * np.log10(4.0 / mse)), rel=1e-4)


@pytest.mark.parametrize("overrides,message", [
    (dict(model__norm_groups=5), "config.model.norm_groups=5: must divide"),
    (dict(model__channel_multipliers=(1, 2, 2, 2), data__image_size=36), "config.data.image_size=36"),
    (dict(model__quantizer="lfq"), "config.model.quantizer='lfq'"),
    (dict(model__fsq_levels=(8, 1)), r"config.model.fsq_levels=\(8, 1\)"),
    (dict(tokenizer__reconstruction_loss="l3"), "config.tokenizer.reconstruction_loss='l3'"),
])
def test_bad_tokenizer_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(tokenizer_config(**overrides), 1)


def test_tokenizer_refuses_data_with_other_channels():
    task = TokenizerTask(tokenizer_config(model__channels=1))
    with pytest.raises(ValueError, match="config.model.channels=1 but data set 'builtin_shapes' has 3-channel"):
        task.check_data([{"image": np.zeros((32, 32, 3), np.uint8)}])


# -------------------------------------------------------------------------------------------------- maskgit model
def test_token_layout_and_tied_head(tokenizer_run):
    task = maskgit_task(tokenizer_run[0])
    model = task.model
    assert model.mask_id == 48 and model.null_class == 10 and model.vocab_size == 48 + 1 + 10 + 1
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 49, (2, task.num_tokens)), jnp.int32)
    labels = jnp.asarray([3, 10], jnp.int32)
    variables = task.init(jax.random.key(0), {"image": images(2)})
    params = nn.meta.unbox(variables)["params"]
    logits = model.apply({"params": params}, tokens, labels)
    hidden = np.asarray(model.apply({"params": params}, tokens, labels, return_hidden=True), np.float64)
    dense = params["mlm_dense"]
    h = hidden @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    h = h * np.asarray(params["mlm_norm"]["scale"]) + np.asarray(params["mlm_norm"]["bias"])
    embedding = np.asarray(params["token_embedding"])
    want = h @ embedding[:48].T + np.asarray(params["mlm_bias"])
    assert logits.shape == (2, task.num_tokens, 48)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)
    # The class token is row K + 1 + label: another label changes every logit.
    other = model.apply({"params": params}, tokens, jnp.asarray([4, 10], jnp.int32))
    assert np.abs(np.asarray(other[0] - logits[0])).max() > 1e-4
    np.testing.assert_allclose(np.asarray(other[1]), np.asarray(logits[1]), atol=1e-6)


def test_check_tokens_names_the_bad_id():
    with pytest.raises(ValueError, match=r"tokens\[1, 2\]=49: token ids must be in \[0, 48\]"):
        check_tokens(np.array([[0, 1, 2], [3, 4, 49]]), 48)
    with pytest.raises(ValueError, match=r"tokens\[0, 0\]=-1"):
        check_tokens(np.array([[-1, 1]]), 48)  # the official code's mask id is not one here


# --------------------------------------------------------------------------------------------------- maskgit loss
def test_loss_is_smoothed_cross_entropy_on_masked_tokens_only(tokenizer_run):
    task = maskgit_task(tokenizer_run[0], maskgit__label_drop=0.0)
    batch = {"image": images(8), "label": jnp.arange(8) % 10}
    params = nn.meta.unbox(task.init(jax.random.key(0), batch))["params"]
    key = jax.random.key(5)
    loss, metrics = task.loss(params, batch, key, train=False)
    ids = np.asarray(task.tokenize(batch["image"]))
    from maskjax.tasks.maskgit import PURPOSE_TOKEN_MASK
    mask_key = jax.random.split(jax.random.fold_in(key, PURPOSE_TOKEN_MASK), 3)[0]
    _, _, masked = task._masked_loss(params, jnp.asarray(ids), batch["label"], mask_key, False)
    masked = np.asarray(masked).astype(bool)
    counts = masked.sum(-1)
    assert counts.min() >= 1 and counts.max() <= task.num_tokens
    inputs = np.where(masked, 48, ids)
    logits = np.asarray(task.model.apply({"params": params}, jnp.asarray(inputs), batch["label"]), np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    targets = np.eye(48)[ids] * 0.9 + 0.1 / 48
    ce = -(targets * log_p).sum(-1)
    assert float(loss) == pytest.approx(ce[masked].mean(), rel=1e-5)
    assert float(metrics["masked_accuracy"]) == pytest.approx((logits.argmax(-1) == ids)[masked].mean())


def test_masked_counts_follow_the_cosine_schedule_on_average(tokenizer_run):
    task = maskgit_task(tokenizer_run[0])
    ids = jnp.zeros((4096, task.num_tokens), jnp.int32)
    from maskjax.masking.schedules import masked_count_for_training
    from maskjax.tasks.maskgit import random_token_mask
    counts = masked_count_for_training("cosine", jax.random.key(0), 4096, task.num_tokens)
    masked = np.asarray(random_token_mask(jax.random.key(1), counts, task.num_tokens))
    np.testing.assert_array_equal(masked.sum(-1), np.asarray(counts))
    assert masked.mean() == pytest.approx(2 / math.pi, abs=0.02)
    assert masked.mean(0).std() < 0.03  # every position equally likely
    del ids


def test_label_drop_trains_the_null_class(tokenizer_run):
    task = maskgit_task(tokenizer_run[0], maskgit__label_drop=1.0)
    batch = {"image": images(4), "label": jnp.asarray([1, 2, 3, 4])}
    params = nn.meta.unbox(task.init(jax.random.key(0), batch))["params"]
    dropped, _ = task.loss(params, batch, jax.random.key(2), train=True)
    null, _ = task.loss(params, dict(batch, label=jnp.full((4,), 10)), jax.random.key(2), train=False)
    kept, _ = task.loss(params, batch, jax.random.key(2), train=False)
    assert float(dropped) == pytest.approx(float(null), rel=1e-6)
    assert abs(float(dropped) - float(kept)) > 1e-6


# ------------------------------------------------------------------------------------------------------ sampling
def test_samples_are_codes_and_guidance_needs_a_null_class(tokenizer_run):
    task = maskgit_task(tokenizer_run[0], maskgit__label_drop=0.1)
    params = nn.meta.unbox(task.init(jax.random.key(0), {"image": images(2)}))["params"]
    final, history = task.sample(params, jnp.asarray([0, 1]), jax.random.key(1), num_steps=4, guidance_scale=2.0)
    assert final.shape == (2, task.num_tokens) and history.shape == (4, 2, task.num_tokens)
    check_tokens(final, 48, allow_mask=False)
    unconditional = maskgit_task(tokenizer_run[0], model__num_classes=0)
    uparams = nn.meta.unbox(unconditional.init(jax.random.key(0), {"image": images(2)}))["params"]
    with pytest.raises(ValueError, match="guidance_scale=1.5: this model has no trained null class"):
        unconditional.sample(uparams, jnp.asarray([0, 0]), jax.random.key(1), guidance_scale=1.5)
    with pytest.raises(ValueError, match="num_steps=65"):
        task.sample(params, jnp.asarray([0, 1]), jax.random.key(1), num_steps=65)


@pytest.mark.parametrize("overrides,message", [
    (dict(maskgit__schedule="cosin"), "config.maskgit.schedule='cosin'"),
    (dict(maskgit__decode_steps=65), "config.maskgit.decode_steps=65"),
    (dict(maskgit__guidance_scale=2.0, maskgit__label_drop=0.0), "config.maskgit.guidance_scale=2.0"),
    (dict(model__codebook_size=1000), "config.model.codebook_size=1000: differs from the tokenizer's codebook "
                                      "size 48"),
])
def test_bad_maskgit_config_is_named(tokenizer_run, overrides, message):
    with pytest.raises(ValueError, match=message):
        maskgit_task(tokenizer_run[0], **overrides)


def test_tokenizer_workdir_must_be_a_tokenizer_run(tmp_path):
    with pytest.raises(ValueError, match="config.maskgit.tokenizer_workdir=.*has no config.json"):
        config_lib.validate(maskgit_config(str(tmp_path)), 1)


@pytest.fixture(scope="module")
def maskgit_run(tokenizer_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("maskgit")
    c = maskgit_config(tokenizer_run[0], total_steps=30, checkpoint_every=30, evals__eval__every=0, log_every=5,
                       optimizer__learning_rate=3e-3)
    Trainer(c, str(workdir)).run()
    return workdir


def test_short_maskgit_run_learns_and_draws_samples(maskgit_run):
    import json
    records = [json.loads(line) for line in open(maskgit_run / "metrics.jsonl")]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.3
    assert any(name.startswith("samples") for name in os.listdir(maskgit_run / "images"))


def test_sample_command_writes_a_grid_and_arrays(maskgit_run, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "grid"
    done = subprocess.run([sys.executable, "-m", "maskjax.sample", f"--workdir={maskgit_run}", "--num=5",
                           "--class=3", "--steps=4", f"--out={out}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    arrays = np.load(f"{out}.npz")
    assert arrays["images"].shape == (5, 32, 32, 3) and np.all(arrays["labels"] == 3)
    check_tokens(arrays["tokens"], 48, allow_mask=False)
    assert os.path.getsize(f"{out}.png") > 0
    bad = subprocess.run([sys.executable, "-m", "maskjax.sample", f"--workdir={maskgit_run}", "--steps=65"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--steps=65: must be in [1, 64]" in bad.stderr


# ---------------------------------------------------------------------------------------- sample-quality evaluator
@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A tiny supervised ViT (3 steps) on the same data: the feature space of the sample-quality evaluator."""
    from configs import vit_builtin
    workdir = str(tmp_path_factory.mktemp("classifier"))
    c = vit_builtin.get_config("runlocal")
    c.progress_bar, c.data.num_threads, c.async_checkpointing = False, 0, False
    c = override(c, total_steps=3, checkpoint_every=3, evals__eval__every=-1, evals__predictions__every=-1,
                 optimizer__warmup_steps=1)
    Trainer(c, workdir).run()
    return workdir


def _random_fid_inception_file(path):
    """A pytorch-fid-format weights file (torchvision layer names) with random weights."""
    from maskjax.convert._torch_compat import import_torch
    torch = import_torch()
    import torchvision
    from safetensors.torch import save_file
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def test_sample_quality_evaluator_scores_samples_in_classifier_features(tokenizer_run, classifier_run, tmp_path,
                                                                       monkeypatch):
    overrides = dict(evals__eval__every=-1, evals__samples__every=-1, evals__quality__every=0,
                     evals__quality__classifier_workdir=classifier_run, evals__quality__num_samples=30,
                     evals__quality__real_examples=40, evals__quality__batch_size=16,
                     evals__quality__kid_subset_size=20, evals__quality__grid_per_class=2,
                     evals__quality__decode_steps=2)
    c = maskgit_config(tokenizer_run[0], total_steps=2, checkpoint_every=2, optimizer__warmup_steps=1,
                       evals__quality__inception_weights=str(tmp_path / "missing.pth"), **overrides)
    with pytest.raises(ValueError, match="config.evals.quality.inception_weights: .*missing.pth.* does not exist"):
        Trainer(c, str(tmp_path / "bad"))
    c.evals.quality.inception_weights = _random_fid_inception_file(tmp_path / "inception.safetensors")
    # The plumbing is under test here (the network against pytorch-fid: tests/evaluate/test_inception.py): the
    # smallest input Inception v3 takes keeps it cheap.
    monkeypatch.setattr("maskjax.evaluate.inception.INPUT_SIZE", 75)
    result = Trainer(c, str(tmp_path)).run()
    import json
    final = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
    for name in ("frechet_distance", "kid", "precision", "recall", "class_accuracy", "inception_fid"):
        assert np.isfinite(final[f"quality/{name}"]), name
    assert final["quality/num_samples"] == 30 and final["quality/num_real"] == 40
    assert 0 <= final["quality/precision"] <= 1 and final["quality/frechet_distance"] > 0
    assert any(n.startswith("quality_per_class") for n in os.listdir(tmp_path / "images"))
    del result


@pytest.mark.parametrize("overrides,message", [
    (dict(evals__quality__every=0), "config.evals.quality.classifier_workdir='': needs the workdir"),
    (dict(evals__quality__every=0, evals__quality__classifier_workdir="x", evals__quality__num_samples=3),
     "config.evals.quality.num_samples=3: must exceed knn_k=3"),
])
def test_bad_sample_quality_options_are_named(tokenizer_run, overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(maskgit_config(tokenizer_run[0], **overrides), 1)


def test_sample_quality_refuses_a_run_that_is_not_a_classifier(tokenizer_run, tmp_path):
    c = maskgit_config(tokenizer_run[0], evals__quality__every=0,
                       evals__quality__classifier_workdir=tokenizer_run[0])
    with pytest.raises(ValueError, match="is a run of task 'tokenizer', not 'classification'"):
        Trainer(c, str(tmp_path))


# ------------------------------------------------------------------------------------------ autoregressive baseline
def ar_task(tokenizer_workdir, **overrides):
    from configs import autoregressive_builtin
    from maskjax.tasks.maskgit import AutoregressiveTask
    c = autoregressive_builtin.get_config(f"runlocal,tokenizer={tokenizer_workdir}")
    c.model.dropout = 0.0
    override(c, **overrides)
    config_lib.validate(c, 1)
    return AutoregressiveTask(c, load_params=load_params)


def test_cached_logits_equal_the_causal_forward_pass(tokenizer_run):
    from maskjax.decode.autoregressive import causal_mask
    task = ar_task(tokenizer_run[0], model__depth=2)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 48, (3, task.num_tokens)), jnp.int32)
    labels = jnp.asarray([0, 5, 9])
    params = nn.meta.unbox(task.init(jax.random.key(0), {"image": images(3)}))["params"]
    full = task._logits(params, ids, labels)  # [B, N, K]: token j+1 given tokens <= j
    sequence = task.model.sequence(ids, labels)
    cache = task.empty_cache(params, 3)
    length = task.num_tokens + 1
    # Prefill 5 positions, then one position at a time.
    logits, state = task.model.apply({"params": params, "cache": cache}, sequence[:, :5], jnp.arange(5),
                                     causal_mask(length)[:, :, :5], method=task.model.at_positions, mutable=["cache"])
    got = [logits]
    cache = state["cache"]

    @jax.jit  # one compilation for every one-token step (the position is an argument)
    def one_token(cache, ids, position):
        mask = (jnp.arange(length) <= position[0])[None, None, None]
        return task.model.apply({"params": params, "cache": cache}, ids, position, mask,
                                method=task.model.at_positions, mutable=["cache"])
    for position in range(5, task.num_tokens):
        logits, state = one_token(cache, sequence[:, position:position + 1], jnp.asarray([position]))
        got.append(logits)
        cache = state["cache"]
    np.testing.assert_allclose(np.concatenate(got, axis=1), np.asarray(full), atol=2e-5, rtol=1e-5)


def test_cached_decode_draws_the_same_samples_as_uncached(tokenizer_run):
    task = ar_task(tokenizer_run[0])
    params = nn.meta.unbox(task.init(jax.random.key(0), {"image": images(2)}))["params"]
    labels = jnp.asarray([1, 7])
    cached = task.sample(params, labels, jax.random.key(3))
    uncached = task.sample(params, labels, jax.random.key(3), cached=False)
    assert cached.shape == (2, task.num_tokens)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
    check_tokens(cached, 48, allow_mask=False)


def test_ar_loss_is_next_token_cross_entropy(tokenizer_run):
    task = ar_task(tokenizer_run[0], autoregressive__label_smoothing=0.0)
    batch = {"image": images(2), "label": jnp.asarray([2, 3])}
    params = nn.meta.unbox(task.init(jax.random.key(0), batch))["params"]
    loss, _ = task.loss(params, batch, jax.random.key(1), train=False)
    ids = np.asarray(task.tokenize(batch["image"]))
    # Independent: the full sequence's logits, one position shifted, by a plain forward pass without the helper.
    mask = np.tril(np.ones((task.num_tokens + 1,) * 2, bool))[None, None]
    logits = np.asarray(task.model.apply({"params": params}, jnp.asarray(ids), batch["label"], mask=jnp.asarray(mask),
                                         all_positions=True), np.float64)[:, :-1]
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    want = -np.take_along_axis(log_p, ids[..., None], -1).mean()
    assert float(loss) == pytest.approx(want, rel=1e-5)
    # Causality: changing the last token does not change the loss terms before it.
    changed = ids.copy()
    changed[:, -1] = (changed[:, -1] + 1) % 48
    again = np.asarray(task.model.apply({"params": params}, jnp.asarray(changed), batch["label"],
                                        mask=jnp.asarray(mask), all_positions=True))[:, :-1]
    np.testing.assert_allclose(again, logits, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------- M2T
def m2t_task(tokenizer_workdir, **overrides):
    from configs import m2t_builtin
    from maskjax.tasks.maskgit import M2TTask
    c = m2t_builtin.get_config(f"runlocal,tokenizer={tokenizer_workdir}")
    c.model.dropout = 0.0
    override(c, **overrides)
    config_lib.validate(c, 1)
    return M2TTask(c, load_params=load_params)


def test_m2t_cached_decode_equals_uncached(tokenizer_run):
    task = m2t_task(tokenizer_run[0], model__depth=2)
    params = nn.meta.unbox(task.init(jax.random.key(0), {"image": images(2)}))["params"]
    labels = jnp.asarray([4, 8])
    cached = task.sample(params, labels, jax.random.key(5))
    uncached = task.sample(params, labels, jax.random.key(5), cached=False)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
    check_tokens(cached, 48, allow_mask=False)


def test_m2t_bits_count_each_group_given_earlier_groups_only(tokenizer_run):
    task = m2t_task(tokenizer_run[0])
    batch = {"image": images(2), "label": jnp.asarray([1, 2])}
    params = nn.meta.unbox(task.init(jax.random.key(0), batch))["params"]
    ids = np.asarray(task.tokenize(batch["image"]))
    nats = np.asarray(task.group_nats(params, jnp.asarray(ids), batch["label"]))
    groups = task.token_group
    dense = np.zeros((task.num_tokens + 1,) * 2, bool)
    dense[:, 0] = True
    dense[1:, 1:] = groups[None, :] < groups[:, None]
    for group in range(1, task.options.decode_steps + 1):
        # Independent: inputs with every group >= `group` masked, under the dense mask written out here.
        inputs = np.where(groups[None] >= group, 48, ids)
        logits = np.asarray(task.model.apply({"params": params}, jnp.asarray(inputs), batch["label"],
                                             mask=jnp.asarray(dense)[None, None]), np.float64)
        log_p = logits - logits.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        want = -np.take_along_axis(log_p, ids[..., None], -1)[..., 0]
        this = groups == group
        np.testing.assert_allclose(nats[:, this], want[:, this], rtol=1e-4, atol=1e-5)


def test_confidence_order_code_length_follows_a_decodable_order(tokenizer_run):
    """Recomputed step by step in numpy: each step reveals the `size` masked tokens with the highest max-probability
    under the revealed ones, and charges -ln p(true token) there."""
    from maskjax.masking.schedules import step_group_sizes
    task = maskgit_task(tokenizer_run[0])
    batch = {"image": images(2), "label": jnp.asarray([5, 6])}
    params = nn.meta.unbox(task.init(jax.random.key(0), batch))["params"]
    ids = np.asarray(task.tokenize(batch["image"]))
    nats = np.asarray(task.confidence_order_nats(params, jnp.asarray(ids), batch["label"]))
    current = np.full(ids.shape, 48)
    want = np.zeros(ids.shape)
    for size in step_group_sizes("cosine", task.num_tokens, task.options.decode_steps):
        logits = np.asarray(task.model.apply({"params": params}, jnp.asarray(current), batch["label"]), np.float64)
        log_p = logits - logits.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        for b in range(2):
            unknown = np.flatnonzero(current[b] == 48)
            chosen = unknown[np.argsort(-log_p[b, unknown].max(-1), kind="stable")[:size]]
            want[b, chosen] = -log_p[b, chosen, ids[b, chosen]]
            current[b, chosen] = ids[b, chosen]
    assert np.all(current != 48)
    np.testing.assert_allclose(nats, want, rtol=1e-4, atol=1e-5)


def test_structure_guided_sampling_runs_on_the_models_attention_maps(tokenizer_run):
    task = maskgit_task(tokenizer_run[0])
    params = nn.meta.unbox(task.init(jax.random.key(0), {"image": images(2)}))["params"]
    labels = jnp.asarray([1, 2])
    guide = task.tokenize(images(1, seed=4))
    maps = np.asarray(task.attention_maps(params, guide, labels[:1]))
    assert maps.shape == (1, task.num_tokens, task.num_tokens) and maps.min() >= 0
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    final, _ = task.sample(params, labels, jax.random.key(2), num_steps=4, structure_guide=guide,
                           structure_weight=5.0)
    check_tokens(final, 48, allow_mask=False)
    with pytest.raises(ValueError, match=r"structure_guide: expected token ids \[1 or 2, 64\], got shape \(3, 64\)"):
        task.sample(params, labels, jax.random.key(2), structure_guide=jnp.zeros((3, 64), jnp.int32))


def test_inpainting_and_outpainting_keep_the_given_tokens(tokenizer_run):
    from maskjax.decode import box_to_token_mask
    task = maskgit_task(tokenizer_run[0])
    params = nn.meta.unbox(task.init(jax.random.key(0), {"image": images(2)}))["params"]
    tokens = task.tokenize(images(2, seed=6))
    labels = jnp.asarray([3, 4])
    region = box_to_token_mask((8, 8, 12, 16), (32, 32), (8, 8))
    edited = np.asarray(task.inpaint(params, tokens, region, labels, jax.random.key(1), num_steps=3))
    np.testing.assert_array_equal(edited[:, ~np.asarray(region)], np.asarray(tokens)[:, ~np.asarray(region)])
    check_tokens(edited, 48, allow_mask=False)
    wide = np.asarray(task.outpaint(params, tokens, labels, jax.random.key(2), extend=6, num_steps=3))
    assert wide.shape == (2, 8, 14)
    np.testing.assert_array_equal(wide[:, :, :8], np.asarray(tokens).reshape(2, 8, 8))
    check_tokens(wide.reshape(2, -1), 48, allow_mask=False)
    tall = np.asarray(task.outpaint(params, tokens, labels, jax.random.key(2), extend=3, direction="down",
                                    num_steps=3))
    assert tall.shape == (2, 11, 8)
    np.testing.assert_array_equal(tall[:, :8], np.asarray(tokens).reshape(2, 8, 8))
    # The whole canvas renders: the tokenizer's decoder is convolutional.
    assert task.detokenize(jnp.asarray(wide)).shape == (2, 32, 56, 3)


def test_perceptual_term_is_the_normalised_block_feature_distance(tokenizer_run, classifier_run):
    config = tokenizer_config(tokenizer__perceptual_weight=0.5, tokenizer__perceptual_workdir=classifier_run)
    config_lib.validate(config, 1)
    task = TokenizerTask(config, load_params=load_params)
    params, _ = load_params(tokenizer_run[0])
    x = images(3)
    reconstruction, _ = task.model.apply({"params": params}, x)
    _, aux_x = task.classifier.apply({"params": task.classifier_params}, x)
    _, aux_r = task.classifier.apply({"params": task.classifier_params}, reconstruction)
    want = []
    for i in range(task.classifier.depth):
        a, b = np.asarray(aux_r[f"block_{i}"], np.float64), np.asarray(aux_x[f"block_{i}"], np.float64)
        a /= np.linalg.norm(a, axis=-1, keepdims=True)
        b /= np.linalg.norm(b, axis=-1, keepdims=True)
        want.append(((a - b) ** 2).sum(-1).mean())
    assert float(task.perceptual_distance(x, reconstruction)) == pytest.approx(np.mean(want), rel=1e-4)
    assert float(task.perceptual_distance(x, x)) == pytest.approx(0.0, abs=1e-6)
    loss, metrics = task.loss(params, {"image": x}, jax.random.key(0), train=False)
    assert float(loss) == pytest.approx(float(metrics["reconstruction_loss"]) + 0.5 * np.mean(want), rel=1e-4)
    with pytest.raises(ValueError, match="config.tokenizer.perceptual_workdir='': needs a classification run"):
        config_lib.validate(tokenizer_config(tokenizer__perceptual_weight=0.5), 1)


def test_adversarial_terms_each_reach_only_their_own_network():
    """One optimizer, two losses: the gradient of the summed loss on the discriminator equals the gradient of the
    hinge loss alone, and on the autoencoder it equals that of reconstruction + w * (-D(x_hat)) alone (both
    written out here with plain jax.grad)."""
    config = tokenizer_config(model__discriminator_filters=8, tokenizer__adversarial_weight=0.3)
    config_lib.validate(config, 1)
    task = TokenizerTask(config)
    x = images(2)
    params = nn.meta.unbox(task.init(jax.random.key(0), {"image": x}))["params"]
    assert "discriminator" in params

    def total(p):
        return task.loss(p, {"image": x}, jax.random.key(1), train=True, step=jnp.asarray(5))[0]

    def disc(p):
        reconstruction = task.model.apply({"params": p}, x)[0]
        d = lambda images: task.model.apply({"params": p}, images, method=task.model.discriminate)
        return jnp.mean(jax.nn.relu(1 - d(x))) + jnp.mean(jax.nn.relu(1 + d(reconstruction)))

    def autoencoder(p):
        reconstruction = task.model.apply({"params": p}, x)[0]
        fake = task.model.apply({"params": p}, reconstruction, method=task.model.discriminate)
        return jnp.mean((reconstruction - x) ** 2) + 0.3 * -jnp.mean(fake)

    g_total, g_disc, g_ae = jax.grad(total)(params), jax.grad(disc)(params), jax.grad(autoencoder)(params)
    for a, b in zip(jax.tree.leaves(g_total["discriminator"]), jax.tree.leaves(g_disc["discriminator"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for part in ("encoder", "decoder"):
        for a, b in zip(jax.tree.leaves(g_total[part]), jax.tree.leaves(g_ae[part])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="config.tokenizer.adversarial_weight=0.3: needs a discriminator"):
        config_lib.validate(tokenizer_config(tokenizer__adversarial_weight=0.3), 1)
