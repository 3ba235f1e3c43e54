"""Shared machinery of the checkpoint converters: reading state dicts (dicts of numpy arrays or torch tensors,
.safetensors / .pth files), validating their keys and shapes up front, and writing them back.

A *state dict* here is a flat `{name: array}` mapping in PyTorch's conventions (Linear weights [out, in], Conv2d
weights [out, in, kh, kw]); maskjax *params* are the nested Flax tree (Dense kernels [in, out], Conv kernels
[kh, kw, in, out]).
"""

import os
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import numpy as np

StateDict = dict[str, np.ndarray]
TENSOR_FORMATS = ("pt", "np")
# Wrappers some training scripts put around the weights (MAE/DeiT: 'model'; Lightning/others: 'state_dict').
_CHECKPOINT_WRAPPERS = ("state_dict", "model", "module")


def to_numpy(value: Any, name: str = "value") -> np.ndarray:
    """A torch tensor (any device / dtype, bfloat16 included), jax or numpy array -> float32/int numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch.
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return tensor.numpy().copy()
    try:
        array = np.asarray(value)
    except Exception as error:  # noqa: BLE001  (reported with the key that failed)
        raise ValueError(f"{name}: cannot convert {type(value).__name__} to an array ({error})") from error
    if array.dtype == object:
        raise ValueError(f"{name}: expected an array or tensor, got {type(value).__name__}")
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16" \
        else array


def load_state_dict(source: Union[str, os.PathLike, Mapping[str, Any]]) -> StateDict:
    """A state dict as `{key: numpy array}` from a mapping (numpy arrays / torch tensors) or a file path.

    Files: '.safetensors' (read with safetensors' numpy loader, no torch needed); '.pth', '.pt', '.bin', '.ckpt'
    (torch.load with weights_only=True on the CPU). A checkpoint that wraps its weights in 'model' / 'state_dict'
    (MAE, DeiT, Lightning) is unwrapped; a DistributedDataParallel 'module.' prefix is removed.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"state dict path {path!r} is not a file")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            try:
                source = load_file(path)
            except Exception as error:  # noqa: BLE001  (safetensors raises its own error types)
                raise ValueError(f"could not read safetensors file {path!r}: {error}") from error
        elif path.endswith((".pth", ".pt", ".bin", ".ckpt")):
            from maskjax.convert._torch_compat import import_torch
            source = import_torch().load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"state dict path {path!r}: expected a .safetensors, .pth, .pt, .bin or .ckpt file")
    if not isinstance(source, Mapping):
        raise ValueError(f"state dict: expected a mapping of names to arrays or a file path, got "
                         f"{type(source).__name__}")
    for wrapper in _CHECKPOINT_WRAPPERS:
        if wrapper in source and isinstance(source[wrapper], Mapping):
            source = source[wrapper]
            break
    state = {}
    for key, value in source.items():
        if not isinstance(key, str):
            raise ValueError(f"state dict: keys must be strings, got {key!r}")
        state[key[len("module."):] if key.startswith("module.") else key] = to_numpy(value, key)
    return state


def check_state_dict(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple], what: str) -> None:
    """ValueError listing every missing key, unexpected key and shape mismatch (key, got, expected) of `state`."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: got shape {tuple(state[k].shape)}, expected {tuple(expected[k])}"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if problems:
        raise ValueError(f"{what}: " + " | ".join(problems))


def require_key(state: Mapping[str, np.ndarray], key: str, what: str, ndim: Optional[int] = None) -> np.ndarray:
    """state[key], with a ValueError naming the key when it is missing or has the wrong rank."""
    if key not in state:
        raise ValueError(f"{what}: missing key {key!r} (needed to read the model's shape)")
    value = state[key]
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{what}: {key!r} has shape {tuple(value.shape)}, expected a rank-{ndim} array")
    return value


def unwrap_params(params: Mapping[str, Any]) -> dict:
    """maskjax params as a plain nested dict of numpy arrays: accepts {'params': tree} or the tree, boxed or not."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params: expected a (nested) mapping, got {type(params).__name__}")
    if set(params) == {"params"}:
        params = params["params"]
    tree = nn.meta.unbox(params)

    def plain(node, path):
        if isinstance(node, Mapping):
            return {str(k): plain(v, f"{path}/{k}") for k, v in node.items()}
        return to_numpy(node, path.lstrip("/"))

    return plain(tree, "")


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
        else:
            flat[name] = value
    return flat


def check_params(flat: Mapping[str, np.ndarray], expected: Mapping[str, tuple], what: str) -> None:
    """Like `check_state_dict`, for flattened maskjax params ('encoder/block_0/attn/query/kernel')."""
    check_state_dict(flat, expected, what)


def param_shape(flat: Mapping[str, np.ndarray], key: str, what: str, ndim: int) -> tuple:
    """Shape of flat[key] (rank `ndim`), with a ValueError naming the key when it is missing or of another rank."""
    return tuple(require_key(flat, key, what, ndim).shape)


def to_format(state: StateDict, tensors: str) -> dict:
    """state dict of numpy arrays -> torch tensors ('pt') or numpy arrays ('np')."""
    if tensors not in TENSOR_FORMATS:
        raise ValueError(f"tensors={tensors!r} must be one of {TENSOR_FORMATS}")
    if tensors == "np":
        return {k: np.ascontiguousarray(v) for k, v in state.items()}
    from maskjax.convert._torch_compat import import_torch
    torch = import_torch()
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def save_state_dict(state: Mapping[str, Any], path: Union[str, os.PathLike]) -> None:
    """Writes a state dict to '.safetensors' (no torch needed) or '.pth'/'.pt'/'.bin' (torch.save of tensors)."""
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(to_numpy(v, k)) for k, v in state.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file
        save_file(arrays, path)
    elif path.endswith((".pth", ".pt", ".bin")):
        from maskjax.convert._torch_compat import import_torch
        import_torch().save(to_format(arrays, "pt"), path)
    else:
        raise ValueError(f"save_state_dict: path {path!r} must end in .safetensors, .pth, .pt or .bin")


# ------------------------------------------------------------------------------------ layout transforms (shared)
def linear_to_dense(weight: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return np.ascontiguousarray(weight.T)


def conv_to_flax(weight: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def conv_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Flax Conv kernel [kh, kw, in, out] -> torch Conv2d weight [out, in, kh, kw]."""
    return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def heads_in(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """torch Linear weight [heads * head_dim, in] -> maskjax HeadsProjection kernel [in, heads, head_dim]."""
    out_features, in_features = weight.shape
    return np.ascontiguousarray(weight.T.reshape(in_features, num_heads, out_features // num_heads))


def heads_out(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """torch Linear weight [out, heads * head_dim] -> maskjax HeadsOutProjection kernel [heads, head_dim, out]."""
    out_features, in_features = weight.shape
    return np.ascontiguousarray(weight.T.reshape(num_heads, in_features // num_heads, out_features))


def set_path(tree: dict, path: str, value: np.ndarray) -> None:
    """tree['a']['b']['c'] = value for path 'a/b/c' (creating the dicts)."""
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


# A pre-LN transformer block in PyTorch layout, under framework-neutral names; each converter maps its own key
# names to these, and `block_to_maskjax` / `block_from_maskjax` handle the maskjax side once for all of them.
BLOCK_PARTS = ("norm1.weight", "norm1.bias", "q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias",
               "o.weight", "o.bias", "norm2.weight", "norm2.bias", "fc1.weight", "fc1.bias", "fc2.weight",
               "fc2.bias")
OPTIONAL_BLOCK_PARTS = ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias", "ls1", "ls2")


def block_to_maskjax(parts: Mapping[str, np.ndarray], num_heads: int) -> dict:
    """PyTorch-layout block parts (names in BLOCK_PARTS / OPTIONAL_BLOCK_PARTS) -> maskjax Encoder1DBlock params."""
    head_dim = parts["q.weight"].shape[0] // num_heads
    attn = {}
    for name, part in (("query", "q"), ("key", "k"), ("value", "v")):
        attn[name] = {"kernel": heads_in(parts[f"{part}.weight"], num_heads),
                      "bias": parts[f"{part}.bias"].reshape(num_heads, head_dim).copy()}
    attn["out"] = {"kernel": heads_out(parts["o.weight"], num_heads), "bias": parts["o.bias"].copy()}
    if "q_norm.weight" in parts:
        attn["query_norm"] = {"scale": parts["q_norm.weight"].copy(), "bias": parts["q_norm.bias"].copy()}
        attn["key_norm"] = {"scale": parts["k_norm.weight"].copy(), "bias": parts["k_norm.bias"].copy()}
    block = {
        "norm1": {"scale": parts["norm1.weight"].copy(), "bias": parts["norm1.bias"].copy()},
        "attn": attn,
        "norm2": {"scale": parts["norm2.weight"].copy(), "bias": parts["norm2.bias"].copy()},
        "mlp": {"fc1": {"kernel": linear_to_dense(parts["fc1.weight"]), "bias": parts["fc1.bias"].copy()},
                "fc2": {"kernel": linear_to_dense(parts["fc2.weight"]), "bias": parts["fc2.bias"].copy()}},
    }
    if "ls1" in parts:
        block["ls1"] = {"scale": parts["ls1"].copy()}
        block["ls2"] = {"scale": parts["ls2"].copy()}
    return block


def block_from_maskjax(block: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """maskjax Encoder1DBlock params -> PyTorch-layout block parts (inverse of `block_to_maskjax`)."""
    attn = block["attn"]
    parts = {"norm1.weight": block["norm1"]["scale"], "norm1.bias": block["norm1"]["bias"],
             "norm2.weight": block["norm2"]["scale"], "norm2.bias": block["norm2"]["bias"]}
    for name, part in (("query", "q"), ("key", "k"), ("value", "v")):
        kernel = attn[name]["kernel"]  # [in, heads, head_dim]
        parts[f"{part}.weight"] = np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T)
        parts[f"{part}.bias"] = attn[name]["bias"].reshape(-1)
    out = attn["out"]["kernel"]  # [heads, head_dim, out]
    parts["o.weight"] = np.ascontiguousarray(out.reshape(-1, out.shape[-1]).T)
    parts["o.bias"] = attn["out"]["bias"]
    if "query_norm" in attn:
        parts.update({"q_norm.weight": attn["query_norm"]["scale"], "q_norm.bias": attn["query_norm"]["bias"],
                      "k_norm.weight": attn["key_norm"]["scale"], "k_norm.bias": attn["key_norm"]["bias"]})
    for name in ("fc1", "fc2"):
        parts[f"{name}.weight"] = linear_to_dense(block["mlp"][name]["kernel"])
        parts[f"{name}.bias"] = block["mlp"][name]["bias"]
    if "ls1" in block:
        parts["ls1"], parts["ls2"] = block["ls1"]["scale"], block["ls2"]["scale"]
    return {k: np.ascontiguousarray(v) for k, v in parts.items()}


def block_param_shapes(width: int, mlp_dim: int, num_heads: int, *, qk_norm: bool = False,
                       layer_scale: bool = False) -> dict[str, tuple]:
    """Flattened shapes of a maskjax Encoder1DBlock's params ('attn/query/kernel' -> shape)."""
    head_dim = width // num_heads
    shapes = {"norm1/scale": (width,), "norm1/bias": (width,), "norm2/scale": (width,), "norm2/bias": (width,),
              "attn/out/kernel": (num_heads, head_dim, width), "attn/out/bias": (width,),
              "mlp/fc1/kernel": (width, mlp_dim), "mlp/fc1/bias": (mlp_dim,),
              "mlp/fc2/kernel": (mlp_dim, width), "mlp/fc2/bias": (width,)}
    for name in ("query", "key", "value"):
        shapes[f"attn/{name}/kernel"] = (width, num_heads, head_dim)
        shapes[f"attn/{name}/bias"] = (num_heads, head_dim)
    if qk_norm:
        for name in ("query_norm", "key_norm"):
            shapes[f"attn/{name}/scale"] = (head_dim,)
            shapes[f"attn/{name}/bias"] = (head_dim,)
    if layer_scale:
        shapes["ls1/scale"] = (width,)
        shapes["ls2/scale"] = (width,)
    return shapes


def read_hf_config(config: Any, fields: Mapping[str, Any], *, count_labels: bool = False) -> tuple[dict, Any]:
    """The `fields` ({name: default, None = required}) of a Hugging Face config (object or `to_dict()`), and its
    getter. `count_labels`: also 'num_labels', from `num_labels` or else the length of `id2label`. A ValueError
    names a missing field."""
    get = (lambda k: config.get(k)) if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
    cfg = {}
    for name, default in fields.items():
        value = get(name)
        if value is None:
            if default is None:
                raise ValueError(f"config: missing field {name!r}")
            value = default
        cfg[name] = value
    if count_labels:
        num_labels = get("num_labels")
        if num_labels is None:
            id2label = get("id2label")
            if not id2label:
                raise ValueError("config: missing field 'num_labels' (and no 'id2label' to count)")
            num_labels = len(id2label)
        cfg["num_labels"] = num_labels
    return cfg, get
