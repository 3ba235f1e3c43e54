"""The official MaskGIT JAX checkpoints (github.com/google-research/maskgit; PyPI `maskgit`) -> maskjax modules.

    tok_params, tok_kwargs = official_tokenizer_to_maskjax("tokenizer_imagenet256_checkpoint")
    tokenizer = Tokenizer(**tok_kwargs)                       # layout='maskgit': the official VQGAN's blocks
    params, kwargs = official_transformer_to_maskjax("maskgit_imagenet256_checkpoint", codebook_size=1024,
                                                     num_classes=1000)
    transformer = MaskGITTransformer(**kwargs)                # post-LN BERT blocks, tanh GELU, LayerNorm eps 1e-12

The checkpoints are flax msgpack files (`flax.serialization.to_bytes` of the variables); a path, their bytes, or
the restored `{'params': ...}` tree (or the bare params tree) are accepted. Every shape is checked against the
maskjax module before anything is returned; errors name the official key and both shapes.

Token ids. The official transformer's vocabulary is `K + C + 1` rows: codes [0, K), classes [K, K + C), and the
mask token, which the official code writes as id -1 and which `jnp.take` wraps to the last row K + C. maskjax's
vocabulary is `K + 1 + C + 1`: codes [0, K), the mask K, classes K + 1 + c, and a null class K + 1 + C for
classifier-free guidance. The import moves the rows accordingly; the official model was trained without label
dropout, so it has no null class: that row is set to the mean of the class rows, and guidance (w > 0) with
imported weights samples from an unconditional branch the model never learnt. The official MLM bias covers the
whole vocabulary; maskjax keeps its code part (the official sampler also slices the logits to [:K]).

Images. The official VQGAN sees pixels in [0, 1]; `Tokenizer(layout='maskgit')` maps maskjax's [-1, 1] at its
boundary, so images in and out keep maskjax's range.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from maskjax.convert.common import check_params, flatten_params, require_key, set_path, unwrap_params

Source = Union[str, os.PathLike, bytes, Mapping[str, Any]]
# The ImageNet 256/512 tokenizer (the official `configs/vqgan_config.py`).
IMAGENET_TOKENIZER = dict(filters=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2, embedding_dim=256,
                          codebook_size=1024)
OFFICIAL_LAYER_NORM_EPS = 1e-12
OFFICIAL_GROUPS = 32  # flax.linen.GroupNorm's default num_groups, which the official code does not change.


def load_official_checkpoint(source: Source) -> dict[str, np.ndarray]:
    """Flattened official params {'Embed_0/word_embeddings/embedding': array, ...} from a checkpoint path, its
    bytes, or a restored variables / params tree."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"official MaskGIT checkpoint {path!r} is not a file")
        with open(path, "rb") as f:
            source = f.read()
    if isinstance(source, bytes):
        from flax import serialization
        try:
            source = serialization.msgpack_restore(source)
        except Exception as error:  # noqa: BLE001  (msgpack raises several types)
            raise ValueError(f"official MaskGIT checkpoint: not a flax msgpack file ({error})") from error
    if not isinstance(source, Mapping):
        raise ValueError(f"official MaskGIT checkpoint: expected a path, bytes or a params mapping, got "
                         f"{type(source).__name__}")
    return flatten_params(unwrap_params(source))


def _expected_shapes(module: Any, *example_inputs: Any) -> dict[str, tuple]:
    import flax.linen as nn
    import jax
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs))
    return {k: tuple(v.shape) for k, v in flatten_params(nn.meta.unbox(shapes["params"])).items()}


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        set_path(tree, key, np.asarray(value, np.float32))
    return tree


# --------------------------------------------------------------------------------------------------------------------
# Transformer

_BLOCK_KEYS = {  # maskjax Encoder1DBlock path -> official TransformerLayer path
    "norm1/scale": "Attention_0/attention_output_ln/scale", "norm1/bias": "Attention_0/attention_output_ln/bias",
    "norm2/scale": "Mlp_0/layer_output_ln/scale", "norm2/bias": "Mlp_0/layer_output_ln/bias",
    "mlp/fc1/kernel": "Mlp_0/intermediate_output/kernel", "mlp/fc1/bias": "Mlp_0/intermediate_output/bias",
    "mlp/fc2/kernel": "Mlp_0/layer_output/kernel", "mlp/fc2/bias": "Mlp_0/layer_output/bias",
    **{f"attn/{p}/{w}": f"Attention_0/self_attention/{p}/{w}" for p in ("query", "key", "value", "out")
       for w in ("kernel", "bias")},
}
_TOP_KEYS = {"embed_norm/scale": "Embed_0/embeddings_ln/scale", "embed_norm/bias": "Embed_0/embeddings_ln/bias",
             "posemb": "Embed_0/position_embeddings/embedding",
             "mlm_dense/kernel": "MlmLayer_0/mlm_dense/kernel", "mlm_dense/bias": "MlmLayer_0/mlm_dense/bias",
             "mlm_norm/scale": "MlmLayer_0/mlm_ln/scale", "mlm_norm/bias": "MlmLayer_0/mlm_ln/bias"}
_WORDS = "Embed_0/word_embeddings/embedding"


def official_transformer_to_maskjax(source: Source, *, codebook_size: int = 1024,
                                    num_classes: int = 1000) -> tuple[dict, dict]:
    """Official `maskgit_transformer.Transformer` params -> (maskjax `MaskGITTransformer` params, its kwargs).

    Width, depth, heads, MLP width and the number of image tokens are read from the shapes; `codebook_size` K and
    `num_classes` C must satisfy vocab = K + C + 1 (1024 + 1000 + 1 for the ImageNet checkpoints).
    """
    from maskjax.models.maskgit import MaskGITTransformer
    what = "official_transformer_to_maskjax"
    flat = load_official_checkpoint(source)
    words = require_key(flat, _WORDS, what, 2)
    vocab, width = words.shape
    if vocab != codebook_size + num_classes + 1:
        raise ValueError(f"{what}: {_WORDS} has {vocab} rows, but codebook_size={codebook_size} + "
                         f"num_classes={num_classes} + 1 (mask) = {codebook_size + num_classes + 1}")
    positions = require_key(flat, _TOP_KEYS["posemb"], what, 2).shape[0]
    layers = sorted({int(m.group(1)) for k in flat for m in [re.match(r"TransformerLayer_(\d+)/", k)] if m})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"{what}: expected TransformerLayer_0 .. TransformerLayer_<depth-1>, found layers {layers}")
    num_heads = require_key(flat, "TransformerLayer_0/Attention_0/self_attention/query/kernel", what, 3).shape[1]
    mlp_dim = require_key(flat, "TransformerLayer_0/Mlp_0/intermediate_output/kernel", what, 2).shape[1]
    kwargs = dict(codebook_size=codebook_size, num_classes=num_classes, num_tokens=positions - 1, width=width,
                  depth=len(layers), num_heads=num_heads, mlp_dim=mlp_dim, layer_norm_eps=OFFICIAL_LAYER_NORM_EPS,
                  norm_position="post", approximate_gelu=True)

    k, c = codebook_size, num_classes
    out = {ours: require_key(flat, official, what) for ours, official in _TOP_KEYS.items()}
    for i in layers:
        for ours, official in _BLOCK_KEYS.items():
            out[f"encoder/block_{i}/{ours}"] = require_key(flat, f"TransformerLayer_{i}/{official}", what)
    out["token_embedding"] = np.concatenate([words[:k], words[k + c:k + c + 1], words[k:k + c],
                                             words[k:k + c].mean(axis=0, keepdims=True)], axis=0)
    out["mlm_bias"] = require_key(flat, "MlmLayer_0/mlm_bias/bias", what, 1)[:k]
    unused = sorted(set(flat) - set(_TOP_KEYS.values()) - {_WORDS, "MlmLayer_0/mlm_bias/bias"}
                    - {f"TransformerLayer_{i}/{o}" for i in layers for o in _BLOCK_KEYS.values()})
    if unused:
        raise ValueError(f"{what}: unexpected official keys {unused}")

    import jax.numpy as jnp
    model = MaskGITTransformer(**kwargs)
    check_params(out, _expected_shapes(model, jnp.zeros((1, kwargs["num_tokens"]), jnp.int32),
                                       jnp.zeros((1,), jnp.int32)), what)
    return _nest(out), kwargs


def official_sequence_to_maskjax(sequence: Any, codebook_size: int, num_classes: int) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """An official input sequence int [B, 1 + N] (class id K + c at position 0, codes, -1 = mask) -> maskjax's
    (tokens int32 [B, N] with mask id K, labels int32 [B])."""
    sequence = np.asarray(sequence)
    labels = sequence[:, 0] - codebook_size
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"official sequence: position 0 must hold class ids in [{codebook_size}, "
                         f"{codebook_size + num_classes}), got {sequence[:, 0].min()}..{sequence[:, 0].max()}")
    tokens = sequence[:, 1:]
    if ((tokens < -1) | (tokens >= codebook_size)).any():
        raise ValueError(f"official sequence: image ids must be codes in [0, {codebook_size}) or -1 (mask)")
    return np.where(tokens == -1, codebook_size, tokens).astype(np.int32), labels.astype(np.int32)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer

def _res_block(flat: Mapping, official: str, ours: str, out: dict, what: str) -> None:
    for o, m in (("GroupNorm_0", "norm1"), ("GroupNorm_1", "norm2")):
        for w in ("scale", "bias"):
            out[f"{ours}/{m}/{w}"] = require_key(flat, f"{official}/{o}/{w}", what, 1)
    out[f"{ours}/conv1/kernel"] = require_key(flat, f"{official}/Conv_0/kernel", what, 4)
    out[f"{ours}/conv2/kernel"] = require_key(flat, f"{official}/Conv_1/kernel", what, 4)
    if f"{official}/Conv_2/kernel" in flat:
        out[f"{ours}/skip/kernel"] = flat[f"{official}/Conv_2/kernel"]


def _conv_params(flat: Mapping, official: str, ours: str, out: dict, what: str, bias: bool = True) -> None:
    out[f"{ours}/kernel"] = require_key(flat, f"{official}/kernel", what, 4)
    if bias:
        out[f"{ours}/bias"] = require_key(flat, f"{official}/bias", what, 1)


def official_tokenizer_to_maskjax(source: Source, *, filters: int = IMAGENET_TOKENIZER["filters"],
                                  channel_multipliers: Sequence[int] = IMAGENET_TOKENIZER["channel_multipliers"],
                                  num_res_blocks: int = IMAGENET_TOKENIZER["num_res_blocks"],
                                  image_size: int = 256) -> tuple[dict, dict]:
    """Official `vqgan_tokenizer.VQVAE` (quantizer 'vq', GroupNorm, swish, no conv downsampling) params ->
    (maskjax `Tokenizer` params, its kwargs). The architecture arguments default to the ImageNet checkpoints';
    the codebook size and embedding width are read from the codebook."""
    from maskjax.models.tokenizer import Tokenizer
    what = "official_tokenizer_to_maskjax"
    flat = load_official_checkpoint(source)
    codebook = require_key(flat, "quantizer/codebook", what, 2)
    levels = len(channel_multipliers)
    kwargs = dict(quantizer="vq", codebook_size=int(codebook.shape[0]), embedding_dim=int(codebook.shape[1]),
                  filters=filters, channel_multipliers=tuple(channel_multipliers), num_res_blocks=num_res_blocks,
                  norm_groups=OFFICIAL_GROUPS, channels=3, layout="maskgit")
    import jax.numpy as jnp
    expected = _expected_shapes(Tokenizer(**kwargs), jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    if len(flat) != len(expected):
        raise ValueError(f"{what}: the checkpoint has {len(flat)} arrays, the tokenizer with filters={filters}, "
                         f"channel_multipliers={tuple(channel_multipliers)}, num_res_blocks={num_res_blocks} has "
                         f"{len(expected)}: pass the checkpoint's architecture")
    out = {"quantize/codebook": codebook}
    # Encoder: Conv_0 (in, no bias), ResBlocks per level then the middle ones, GroupNorm_0, Conv_1 (1x1 out).
    _conv_params(flat, "encoder/Conv_0", "encoder/conv_in", out, what, bias=False)
    names = [f"level{lv}_block{i}" for lv in range(levels) for i in range(num_res_blocks)] + \
        [f"mid_block{i}" for i in range(num_res_blocks)]
    for j, name in enumerate(names):
        _res_block(flat, f"encoder/ResBlock_{j}", f"encoder/{name}", out, what)
    for w in ("scale", "bias"):
        out[f"encoder/norm_out/{w}"] = require_key(flat, f"encoder/GroupNorm_0/{w}", what, 1)
    _conv_params(flat, "encoder/Conv_1", "encoder/conv_out", out, what)
    # Decoder: Conv_0 (in), middle ResBlocks, then per level from the deepest: ResBlocks and (above level 0) the
    # conv after upsampling; GroupNorm_0 and the last Conv (out).
    _conv_params(flat, "decoder/Conv_0", "decoder/conv_in", out, what)
    names = [f"mid_block{i}" for i in range(num_res_blocks)] + \
        [f"level{lv}_block{i}" for lv in reversed(range(levels)) for i in range(num_res_blocks)]
    for j, name in enumerate(names):
        _res_block(flat, f"decoder/ResBlock_{j}", f"decoder/{name}", out, what)
    for j, level in enumerate(reversed(range(1, levels))):
        _conv_params(flat, f"decoder/Conv_{j + 1}", f"decoder/level{level}_up", out, what)
    for w in ("scale", "bias"):
        out[f"decoder/norm_out/{w}"] = require_key(flat, f"decoder/GroupNorm_0/{w}", what, 1)
    _conv_params(flat, f"decoder/Conv_{levels}", "decoder/conv_out", out, what)

    check_params(out, expected, what)
    return _nest(out), kwargs


# --------------------------------------------------------------------------------------------------------------------
# As maskjax runs

def write_runs(tokenizer_checkpoint: Source, transformer_checkpoint: Source, workdir: str, *,
               image_size: int = 256, num_classes: int = 1000, data_name: str = "tfds:imagenet2012",
               tokenizer_architecture: Optional[Mapping[str, Any]] = None, decode_steps: int = 8) -> tuple[str, str]:
    """Writes the official checkpoints as two maskjax runs, `<workdir>/tokenizer` (task 'tokenizer') and
    `<workdir>/maskgit` (task 'maskgit', reading that tokenizer): config.json plus the parameters at step 0. They
    are for sampling (`python -m maskjax.sample --workdir=<workdir>/maskgit`), editing and `init_from`; they hold
    no optimizer state, so they are not runs to resume training in. Returns the two run directories."""
    import jax

    from maskjax.train import workdir as workdir_lib
    from maskjax.train.checkpoint import Checkpointer
    from maskjax.train.config import base_config

    architecture = {key: IMAGENET_TOKENIZER[key] for key in ("filters", "channel_multipliers", "num_res_blocks")}
    architecture.update(tokenizer_architecture or {})
    tok_params, tok_kwargs = official_tokenizer_to_maskjax(tokenizer_checkpoint, image_size=image_size,
                                                           **architecture)
    f = 2 ** (len(tok_kwargs["channel_multipliers"]) - 1)
    gen_params, gen_kwargs = official_transformer_to_maskjax(
        transformer_checkpoint, codebook_size=tok_kwargs["codebook_size"], num_classes=num_classes)
    if gen_kwargs["num_tokens"] != (image_size // f) ** 2:
        raise ValueError(f"write_runs: the transformer has {gen_kwargs['num_tokens']} image positions, the "
                         f"tokenizer makes {(image_size // f) ** 2} tokens of a {image_size}x{image_size} image")
    workdir = os.path.abspath(workdir)
    tokenizer_dir, maskgit_dir = os.path.join(workdir, "tokenizer"), os.path.join(workdir, "maskgit")
    for run in (tokenizer_dir, maskgit_dir):
        if os.path.exists(os.path.join(run, "checkpoints")):
            raise ValueError(f"write_runs: {run} already holds checkpoints; pick another workdir")

    tok = base_config("tokenizer")
    tok.data.name, tok.data.image_size = data_name, image_size
    for key, value in tok_kwargs.items():
        tok.model[key] = value
    gen = base_config("maskgit")
    gen.data.name, gen.data.image_size = data_name, image_size
    gen.maskgit.tokenizer_workdir = tokenizer_dir
    gen.maskgit.decode_steps, gen.maskgit.choice_temperature, gen.maskgit.label_smoothing = decode_steps, 4.5, 0.1
    for key in ("num_classes", "width", "depth", "num_heads", "mlp_dim", "norm_position", "approximate_gelu",
                "layer_norm_eps", "codebook_size"):
        gen.model[key] = gen_kwargs[key]
    gen.model.dropout = 0.1
    for run, config, params in ((tokenizer_dir, tok, tok_params), (maskgit_dir, gen, gen_params)):
        os.makedirs(run, exist_ok=True)
        checkpointer = Checkpointer(run, keep=1, async_save=False)
        try:
            checkpointer.save(0, {"params": jax.tree.map(jax.numpy.asarray, params)},
                              {"step": 0, "imported_from": "official MaskGIT checkpoint"})
            checkpointer.wait()
        finally:
            checkpointer.close()
        workdir_lib.atomic_write(os.path.join(run, "config.json"), config.to_json_best_effort(indent=2))
    return tokenizer_dir, maskgit_dir


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse
    p = argparse.ArgumentParser(description="Writes the official MaskGIT checkpoints as maskjax runs.")
    p.add_argument("--tokenizer", required=True, help="official tokenizer checkpoint (tokenizer_imagenet256_checkpoint)")
    p.add_argument("--transformer", required=True, help="official MaskGIT checkpoint (maskgit_imagenet256_checkpoint)")
    p.add_argument("--workdir", required=True, help="writes <workdir>/tokenizer and <workdir>/maskgit")
    p.add_argument("--image_size", type=int, default=256, help="256 or 512 for the ImageNet checkpoints")
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--data", default="tfds:imagenet2012", help="config.data.name of the written runs")
    args = p.parse_args(argv)
    try:
        tokenizer_dir, maskgit_dir = write_runs(args.tokenizer, args.transformer, args.workdir,
                                                image_size=args.image_size, num_classes=args.num_classes,
                                                data_name=args.data)
    except ValueError as error:
        raise SystemExit(f"Error: {error}") from None
    print(f"tokenizer run: {tokenizer_dir}\nMaskGIT run:   {maskgit_dir}\n"
          f"sample:        python -m maskjax.sample --workdir={maskgit_dir} --num=8 --class=1 --steps=8")


if __name__ == "__main__":
    main()
