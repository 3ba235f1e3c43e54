"""The official MaskGIT code (PyPI `maskgit`, a test dependency) against maskjax's modules with imported weights:
random official weights, converted, must give the same tokens from the tokenizer, the same reconstructions and
the same transformer logits."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.convert.maskgit_official import (IMAGENET_TOKENIZER, official_sequence_to_maskjax,
                                              official_tokenizer_to_maskjax, official_transformer_to_maskjax)
from maskjax.models.maskgit import MaskGITTransformer
from maskjax.models.tokenizer import Tokenizer

from maskgit.configs import vqgan_config  # noqa: E402  (PyPI maskgit, a test dependency)
from maskgit.libml import mask_schedule  # noqa: E402
from maskgit.nets import maskgit_transformer, vqgan_tokenizer  # noqa: E402

K, C = 24, 5


def _official_transformer(grid: int, width: int = 32, depth: int = 2, heads: int = 4, mlp: int = 64):
    return maskgit_transformer.Transformer(vocab_size=K + C + 1, hidden_size=width, num_hidden_layers=depth,
                                           num_attention_heads=heads, intermediate_size=mlp,
                                           max_position_embeddings=grid * grid + 1)


def _perturbed(variables, seed: int, scale: float = 0.3):
    """Random weights with non-trivial LayerNorm scales and biases (the inits are ones and zeros)."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_transformer_logits_match_the_official_code():
    grid = 3
    official = _official_transformer(grid)
    rng = np.random.default_rng(0)
    batch = 3
    labels = rng.integers(0, C, batch)
    codes = rng.integers(0, K, (batch, grid * grid))
    codes[rng.random(codes.shape) < 0.4] = -1  # the official mask id
    sequence = np.concatenate([labels[:, None] + K, codes], axis=1).astype(np.int32)
    variables = _perturbed(official.init(jax.random.key(1), jnp.asarray(sequence)), seed=2)
    expected = official.apply(variables, jnp.asarray(sequence), deterministic=True)[:, 1:, :K]

    params, kwargs = official_transformer_to_maskjax(flax.serialization.to_bytes(variables), codebook_size=K,
                                                     num_classes=C)
    assert kwargs["num_tokens"] == grid * grid and kwargs["depth"] == 2 and kwargs["num_heads"] == 4
    model = MaskGITTransformer(**kwargs, dropout=0.0)
    tokens, our_labels = official_sequence_to_maskjax(sequence, K, C)
    assert (tokens == K).sum() == (codes == -1).sum()
    got = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(our_labels))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)
    # The imported mask row is the official last row (where id -1 lands).
    words = variables["params"]["Embed_0"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(params["token_embedding"][K], np.asarray(words[-1]))


def test_transformer_import_checks_the_vocabulary_and_keys():
    official = _official_transformer(2)
    variables = official.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match=r"word_embeddings/embedding has 30 rows.*codebook_size=25"):
        official_transformer_to_maskjax(variables, codebook_size=K + 1, num_classes=C)
    extra = flax.core.unfreeze(variables)
    extra["params"]["Stray_0"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match="Stray_0/kernel"):
        official_transformer_to_maskjax(extra, codebook_size=K, num_classes=C)


def _official_tokenizer_config(filters=32, multipliers=(1, 2), blocks=2, dim=8, codebook=16):
    config = vqgan_config.get_config()
    config.vqvae.filters, config.vqvae.channel_multipliers = filters, list(multipliers)
    config.vqvae.num_res_blocks, config.vqvae.embedding_dim, config.vqvae.codebook_size = blocks, dim, codebook
    return config


def _encode_decode(module, images):
    quantized, _ = module.encode({"image": images})
    return module.decode(quantized)


def test_tokenizer_tokens_and_reconstructions_match_the_official_code():
    config = _official_tokenizer_config()
    official = vqgan_tokenizer.VQVAE(config=config, train=False)
    images01 = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))  # the official range [0, 1]
    variables = _perturbed(official.init(jax.random.key(4), images01, method=_encode_decode), seed=5, scale=0.05)
    ids = official.apply(variables, images01, method=official.encode_to_indices)
    assert len(np.unique(np.asarray(ids))) > 3  # a test of the argmin, not of one winning code

    params, kwargs = official_tokenizer_to_maskjax(variables, filters=32, channel_multipliers=(1, 2),
                                                   num_res_blocks=2, image_size=16)
    ours = Tokenizer(**kwargs)
    images = images01 * 2.0 - 1.0  # maskjax's range
    np.testing.assert_array_equal(np.asarray(ours.apply({"params": params}, images, method=ours.encode)),
                                  np.asarray(ids))
    expected = official.apply(variables, ids, method=official.decode_from_indices)
    got = ours.apply({"params": params}, ids.astype(jnp.int32), method=ours.decode_ids)
    np.testing.assert_allclose(np.asarray((got + 1.0) / 2.0), np.asarray(expected), atol=1e-4, rtol=1e-4)


def test_tokenizer_import_refuses_another_architecture():
    config = _official_tokenizer_config(blocks=1)
    official = vqgan_tokenizer.VQVAE(config=config, train=False)
    variables = official.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), method=_encode_decode)
    with pytest.raises(ValueError, match="num_res_blocks=2"):
        official_tokenizer_to_maskjax(variables, filters=32, channel_multipliers=(1, 2), num_res_blocks=2,
                                      image_size=16)


def test_imagenet_checkpoint_shapes_convert():
    """The ImageNet 256 trees (shapes only, from the official modules) import into the maskjax modules that
    configs/maskgit_imagenet256.py builds."""
    config = _official_tokenizer_config(IMAGENET_TOKENIZER["filters"], IMAGENET_TOKENIZER["channel_multipliers"],
                                        IMAGENET_TOKENIZER["num_res_blocks"], IMAGENET_TOKENIZER["embedding_dim"],
                                        IMAGENET_TOKENIZER["codebook_size"])
    official = vqgan_tokenizer.VQVAE(config=config, train=False)
    shapes = jax.eval_shape(lambda: official.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)),
                                                  method=_encode_decode))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    _, kwargs = official_tokenizer_to_maskjax(zeros)
    assert kwargs["codebook_size"] == 1024 and Tokenizer(**kwargs).downsample == 16

    transformer = maskgit_transformer.Transformer(vocab_size=1024 + 1000 + 1, hidden_size=768, num_hidden_layers=24,
                                                  num_attention_heads=16, intermediate_size=3072,
                                                  max_position_embeddings=257)
    shapes = jax.eval_shape(lambda: transformer.init(jax.random.key(0), jnp.zeros((1, 257), jnp.int32)))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    params, kwargs = official_transformer_to_maskjax(zeros)
    assert (kwargs["depth"], kwargs["width"], kwargs["num_heads"], kwargs["num_tokens"]) == (24, 768, 16, 256)
    assert params["token_embedding"].shape == (1024 + 1 + 1000 + 1, 768)


@pytest.mark.parametrize("ours,official", [("cosine", "cosine"), ("linear", "uniform"), ("square", "pow2"),
                                           ("cubic", "pow3"), ("sqrt", "pow0.5"), ("log", "log"), ("exp", "exp")])
def test_schedules_match_the_official_mask_schedule(ours, official):
    from maskjax.masking.schedules import mask_schedule as maskjax_schedule
    ratios = np.linspace(0.01, 0.99, 37, dtype=np.float32)
    expected = np.asarray(mask_schedule.schedule(jnp.asarray(ratios), 256, official))
    got = np.asarray(maskjax_schedule(ours, jnp.asarray(ratios), num_tokens=256))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_written_runs_sample_through_the_maskjax_task(tmp_path):
    """`write_runs` makes a tokenizer run and a MaskGIT run that maskjax's tasks read; the sampled tokens decode to
    the official decoder's images."""
    import os

    from maskjax.convert.maskgit_official import write_runs
    codebook, classes, size = 16, 3, 8
    tok_official = vqgan_tokenizer.VQVAE(config=_official_tokenizer_config(codebook=codebook), train=False)
    tok_variables = _perturbed(tok_official.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                                 method=_encode_decode), seed=1, scale=0.05)
    grid = size // 2
    transformer = maskgit_transformer.Transformer(vocab_size=codebook + classes + 1, hidden_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                                  max_position_embeddings=grid * grid + 1)
    gen_variables = transformer.init(jax.random.key(2), jnp.zeros((1, grid * grid + 1), jnp.int32))
    tok_path, gen_path = tmp_path / "tok.msgpack", tmp_path / "gen.msgpack"
    tok_path.write_bytes(flax.serialization.to_bytes(tok_variables))
    gen_path.write_bytes(flax.serialization.to_bytes(gen_variables))
    _, maskgit_dir = write_runs(str(tok_path), str(gen_path), str(tmp_path / "runs"), image_size=size,
                                num_classes=classes, data_name="builtin_shapes",
                                tokenizer_architecture=dict(filters=32, channel_multipliers=(1, 2), num_res_blocks=2))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        write_runs(str(tok_path), str(gen_path), str(tmp_path / "runs"), image_size=size, num_classes=classes,
                   tokenizer_architecture=dict(filters=32, channel_multipliers=(1, 2), num_res_blocks=2))
    # As `python -m maskjax.sample` reads a run (the command itself: tests/tasks/test_maskgit.py).
    import json

    import ml_collections

    from maskjax.tasks import make_task
    from maskjax.train.checkpoint import load_params
    with open(os.path.join(maskgit_dir, "config.json")) as f:
        task = make_task(ml_collections.ConfigDict(json.load(f)), load_params=load_params)
    params, step = load_params(maskgit_dir)
    assert step == 0
    tokens, _ = task.sample(jax.tree.map(jnp.asarray, params), jnp.asarray([2, 2, 2]), jax.random.key(0), num_steps=4)
    images = np.asarray(task.detokenize(tokens))
    tokens = np.asarray(tokens)
    assert tokens.shape == (3, grid * grid) and tokens.min() >= 0 and tokens.max() < codebook
    expected = tok_official.apply(tok_variables, jnp.asarray(tokens.reshape(3, grid, grid)),
                                  method=tok_official.decode_from_indices)
    np.testing.assert_allclose((images + 1.0) / 2.0, np.asarray(expected), atol=1e-4)
