"""M2T's group mask in maskjax's mask language equals its dense form, and cached decoding equals uncached decoding
with a toy model whose logits depend on what each position may see."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.attention import attention
from maskjax.decode import m2t
from maskjax.masking import schedules


def groups_for(steps=4, grid=(4, 4)):
    order = schedules.halton_order(grid)
    return np.concatenate([[0], schedules.token_groups(order, schedules.step_group_sizes("cosine", 16, steps))])


def test_group_routing_mask_equals_the_dense_mask():
    groups = groups_for()
    dense = m2t.dense_attention_mask(groups)
    np.testing.assert_array_equal(np.asarray(m2t.attention_mask(groups).materialize(17, 17))[0, 0], dense)
    # Every token sees the class token and exactly the tokens of earlier groups.
    for i in range(1, 17):
        assert dense[i, 0] and dense[i].sum() == 1 + int(np.sum((groups[1:] < groups[i])))
    # A query subset (a cached step) gets the rows of the same mask.
    rows = np.array([3, 7, 11])
    np.testing.assert_array_equal(np.asarray(m2t.attention_mask(groups, rows).materialize(3, 17))[0, 0], dense[rows])
    # As attention: identical outputs with the routing mask and the dense bool mask.
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 17, 2, 8)) for i in range(3))
    np.testing.assert_allclose(attention(q, k, v, mask=m2t.attention_mask(groups), backend="reference"),
                               attention(q, k, v, mask=jnp.asarray(dense)[None, None], backend="reference"),
                               atol=1e-6)


def test_bad_groups_are_named():
    with pytest.raises(ValueError, match="every group 1..T present"):
        m2t.decode_uncached(jnp.zeros((1, 1), jnp.int32), jax.random.key(0), None, np.array([0, 1, 3]), mask_id=5)
