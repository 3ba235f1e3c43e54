"""Model FLOPs from the jaxpr: a ViT's matmul count worked out by hand, the same when its blocks are scanned and
rematerialised (recomputation is not model work)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskjax.models.vit import ViT
from maskjax.train.flops import matmul_flops, model_flops_per_step


def vit_flops_by_hand(batch, image, patch, width, depth, mlp, classes, channels=3):
    """2 x multiply-adds of a ViT forward pass with a class token: patch embedding, per block the q/k/v and output
    projections, q.k^T and p.v, the two MLP layers; the head on the class token."""
    patches = (image // patch) ** 2
    tokens = patches + 1
    embed = patches * (patch * patch * channels) * width
    block = 4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp
    head = width * classes
    return 2.0 * batch * (embed + depth * block + head)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_vit_model_flops_equal_the_count_by_hand(scan_layers):
    kw = dict(num_classes=7, patch_size=4, width=32, depth=3, mlp_dim=64, num_heads=2)
    model = ViT(**kw, scan_layers=scan_layers, remat=scan_layers)
    images = jax.ShapeDtypeStruct((5, 16, 16, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((5,), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))

    def loss(p, x, y):
        logits = model.apply(p, x)[0]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    expected = vit_flops_by_hand(5, 16, 4, 32, 3, 64, 7)
    forward, whiles = matmul_flops(jax.make_jaxpr(loss)(params, images, labels))
    assert whiles == 0
    np.testing.assert_allclose(forward, expected, rtol=1e-12)
    # Forward + backward: every matmul's weight and input gradients cost one forward each, except the patch
    # embedding's input gradient (the images are not differentiated); remat's recomputation is not counted.
    embedding = 2.0 * 5 * (16 // 4) ** 2 * (4 * 4 * 3) * 32
    np.testing.assert_allclose(model_flops_per_step(loss, params, images, labels)[0], 3 * expected - embedding,
                               rtol=1e-12)
