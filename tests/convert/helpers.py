"""Helpers shared by the conversion tests."""

import numpy as np


def perturb_(torch, module, scale: float = 0.1, skip=()) -> None:
    """Adds N(0, scale^2) noise to every parameter/buffer of `module` (except names containing a `skip` entry),
    so zero-initialised biases, unit LayerNorm scales and zero tokens all carry information a wrong mapping
    would scramble."""
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_floating_point() and not any(s in name for s in skip):
                tensor.add_(scale * torch.randn_like(tensor))


def random_like_tree(tree, seed: int):
    """A tree of the same structure/shapes with N(0, 0.1^2) float32 leaves (numpy)."""
    import jax
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: (0.1 * rng.standard_normal(np.shape(x))).astype(np.float32), tree)


def assert_trees_identical(a, b) -> None:
    """Same structure, same shapes and bit-identical values."""
    import jax
    paths_a = jax.tree_util.tree_flatten_with_path(a)[0]
    paths_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in paths_a] == [p for p, _ in paths_b]
    for (path, x), (_, y) in zip(paths_a, paths_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, (jax.tree_util.keystr(path), x.shape, y.shape)
        assert np.array_equal(x, y), jax.tree_util.keystr(path)
