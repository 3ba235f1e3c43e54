"""The FID Inception network (the TF 2015-12-05 Inception v3 graph of Heusel et al.'s FID, as ported by pytorch-fid)
in JAX, for Inception FID of samples, from a weights file the user supplies.

maskjax ships no Inception weights and downloads nothing: pass the pytorch-fid weights file
(`pt_inception-2015-12-05-6726825d.pth`, from github.com/mseitzer/pytorch-fid releases; reading a .pth needs torch)
or the same state dict as .safetensors. The sample_quality evaluator uses it when `inception_weights` names the
file (`inception_fid` next to the class-feature metrics).

    params = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")
    features = fid_inception_features(params, images)     # images [B, H, W, 1 or 3] in [-1, 1] -> [B, 2048]

As pytorch-fid: images are resized to 299x299 (bilinear, half-pixel centres, no antialiasing) and the features
are the 2048 channels after the last block, averaged over space. The blocks keep the FID graph's differences from
torchvision's Inception v3: average pools that do not count padding, and a max pool in the last block's pool branch.
BatchNorm (eps 1e-3) is folded into the convolutions.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

FEATURES = 2048
BN_EPS = 1e-3
INPUT_SIZE = 299
# Convolutions without padding (the stem's and the stride-2 ones); every other one pads k // 2 ("same").
_VALID = {"Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_4a_3x3", "Mixed_6a.branch3x3", "Mixed_6a.branch3x3dbl_3",
          "Mixed_7a.branch3x3_2", "Mixed_7a.branch7x7x3_4"}
_STRIDE_2 = {"Conv2d_1a_3x3", "Mixed_6a.branch3x3", "Mixed_6a.branch3x3dbl_3", "Mixed_7a.branch3x3_2",
             "Mixed_7a.branch7x7x3_4"}
_A = ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool")
_B = ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")
_C = ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
      "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool")
_D = ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4")
_E = ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")
_BLOCKS = {"Mixed_5b": _A, "Mixed_5c": _A, "Mixed_5d": _A, "Mixed_6a": _B, "Mixed_6b": _C, "Mixed_6c": _C,
           "Mixed_6d": _C, "Mixed_6e": _C, "Mixed_7a": _D, "Mixed_7b": _E, "Mixed_7c": _E}
CONVS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3") + tuple(
    f"{block}.{conv}" for block, convs in _BLOCKS.items() for conv in convs)

Params = dict[str, dict[str, np.ndarray]]
# pytorch-fid's `InceptionV3` keeps the layers in four Sequentials (its state dict says 'blocks.N.M.').
_PYTORCH_FID_BLOCKS = (("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"), ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
                       ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
                       ("Mixed_7a", "Mixed_7b", "Mixed_7c"))


def _torchvision_names(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "blocks" and len(parts) > 3 and parts[1].isdigit() and parts[2].isdigit():
            block, index = int(parts[1]), int(parts[2])
            if block < len(_PYTORCH_FID_BLOCKS) and index < len(_PYTORCH_FID_BLOCKS[block]):
                key = ".".join([_PYTORCH_FID_BLOCKS[block][index]] + parts[3:])
        out[key] = value
    return out


def fid_inception_from_state_dict(state: Mapping[str, Any]) -> Params:
    """pytorch-fid `InceptionV3` / torchvision `Inception3` state dict (keys 'Mixed_5b.branch1x1.conv.weight' ...,
    optionally under 'blocks.N.'-free names) -> {conv: {'kernel' [kh, kw, in, out], 'bias' [out]}}, BatchNorm folded.
    ValueError names every missing key."""
    from maskjax.convert.common import to_numpy
    state = _torchvision_names(state)
    missing = [f"{name}.{part}" for name in CONVS
               for part in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
               if f"{name}.{part}" not in state]
    if missing:
        raise ValueError(f"FID Inception weights: missing {len(missing)} keys, e.g. {missing[:3]} (expected the "
                         "pytorch-fid file pt_inception-2015-12-05-6726825d.pth)")
    params = {}
    for name in CONVS:
        weight = to_numpy(state[f"{name}.conv.weight"], name).astype(np.float64)
        gamma, beta, mean, var = (to_numpy(state[f"{name}.bn.{p}"], name).astype(np.float64)
                                  for p in ("weight", "bias", "running_mean", "running_var"))
        scale = gamma / np.sqrt(var + BN_EPS)
        params[name] = {"kernel": (weight.transpose(2, 3, 1, 0) * scale).astype(np.float32),
                        "bias": (beta - mean * scale).astype(np.float32)}
    return params


def load_fid_inception(path: Union[str, os.PathLike]) -> Params:
    """The folded parameters of a pytorch-fid weights file (.pth via torch, or .safetensors)."""
    from maskjax.convert.common import load_state_dict
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"FID Inception weights file {path!r} does not exist (maskjax downloads nothing: get "
                         "pt_inception-2015-12-05-6726825d.pth from the pytorch-fid releases)")
    return fid_inception_from_state_dict(load_state_dict(path))


def _conv(params: Mapping, name: str, x: jax.Array) -> jax.Array:
    kernel = jnp.asarray(params[name]["kernel"])
    kh, kw = kernel.shape[:2]
    padding = ((0, 0), (0, 0)) if name in _VALID else ((kh // 2, kh // 2), (kw // 2, kw // 2))
    stride = 2 if name in _STRIDE_2 else 1
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return jax.nn.relu(y + params[name]["bias"])


def _max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


def _avg_pool_excluding_padding(x: jax.Array) -> jax.Array:
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    count = jax.lax.reduce_window(jnp.ones_like(x[:1, :, :, :1]), 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                                  padding)
    return total / count


def _mixed(params: Mapping, block: str, x: jax.Array) -> jax.Array:
    def c(name, y):
        return _conv(params, f"{block}.{name}", y)
    kind = _BLOCKS[block]
    if kind is _A:
        return jnp.concatenate([
            c("branch1x1", x), c("branch5x5_2", c("branch5x5_1", x)),
            c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
            c("branch_pool", _avg_pool_excluding_padding(x))], axis=-1)
    if kind is _B:
        return jnp.concatenate([
            c("branch3x3", x), c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x))),
            _max_pool(x, 2)], axis=-1)
    if kind is _C:
        seven = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
        double = x
        for i in range(1, 6):
            double = c(f"branch7x7dbl_{i}", double)
        return jnp.concatenate([c("branch1x1", x), seven, double,
                                c("branch_pool", _avg_pool_excluding_padding(x))], axis=-1)
    if kind is _D:
        return jnp.concatenate([
            c("branch3x3_2", c("branch3x3_1", x)),
            c("branch7x7x3_4", c("branch7x7x3_3", c("branch7x7x3_2", c("branch7x7x3_1", x)))),
            _max_pool(x, 2)], axis=-1)
    three = c("branch3x3_1", x)
    double = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
    # The FID graph's last block pools its pool branch by max, the one before by average (without padding).
    pooled = _max_pool(x, 1, pad=1) if block == "Mixed_7c" else _avg_pool_excluding_padding(x)
    return jnp.concatenate([c("branch1x1", x), c("branch3x3_2a", three), c("branch3x3_2b", three),
                            c("branch3x3dbl_3a", double), c("branch3x3dbl_3b", double),
                            c("branch_pool", pooled)], axis=-1)


def fid_inception_features(params: Mapping, images: jax.Array) -> jax.Array:
    """images float [B, H, W, 1 or 3] in [-1, 1] -> pool features float32 [B, 2048] (jit-able)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"fid_inception_features: expected images [B, H, W, 1 or 3], got shape {images.shape}")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    # pytorch-fid maps [0, 1] inputs to 2x - 1 after resizing; resizing is linear, so [-1, 1] images go in as is.
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = _conv(params, name, x)
    x = _max_pool(x, 2)
    x = _max_pool(_conv(params, "Conv2d_4a_3x3", _conv(params, "Conv2d_3b_1x1", x)), 2)
    for block in _BLOCKS:
        x = _mixed(params, block, x)
    return jnp.mean(x, axis=(1, 2))
