"""MaskGIT parallel decoding: its invariants (counts, no re-masking, known tokens kept), the choice of the most
confident tokens, classifier-free guidance, editing masks and bad arguments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.decode import Guidance, box_to_token_mask, decode

V, N, B = 16, 24, 3


def fixed_logits_fn(seed=0, scale=3.0):
    """A deterministic stand-in for a model: logits depend on the position and on the sum of known ids."""
    table = jax.random.normal(jax.random.key(seed), (N, V + 1)) * scale

    def fn(tokens):
        known = jnp.where(tokens == V, 0, tokens + 1)
        context = jnp.sum(known, axis=-1, keepdims=True)[..., None] % 5
        return table[None] + 0.5 * context.astype(jnp.float32)
    return fn


def official_counts(schedule_fn, n0, steps):
    counts, remaining = [], n0
    for t in range(steps):
        k = 0 if t == steps - 1 else min(max(math.floor(n0 * schedule_fn((t + 1) / steps) + 1e-9), 1), remaining - 1)
        counts.append(k)
        remaining = k
    return counts


@pytest.mark.parametrize("steps,schedule", [(1, "cosine"), (8, "cosine"), (12, "linear"), (N, "square")])
def test_counts_monotone_and_no_hole(steps, schedule):
    start = jnp.full((B, N), V, jnp.int32)
    final, history = decode(start, jax.random.key(1), fixed_logits_fn(), steps, schedule, mask_id=V)
    history = np.asarray(history)
    assert history.shape == (steps, B, N)
    assert np.all(np.asarray(final) < V) and np.all(np.asarray(final) >= 0)
    np.testing.assert_array_equal(history[-1], np.asarray(final))
    gamma = {"cosine": lambda r: math.cos(math.pi / 2 * r), "linear": lambda r: 1 - r, "square": lambda r: 1 - r * r}
    want = official_counts(gamma[schedule], N, steps)
    np.testing.assert_array_equal((history == V).sum(-1), np.tile(np.array(want)[:, None], (1, B)))
    # A decoded token never changes again.
    for t in range(1, steps):
        decided = history[t - 1] != V
        np.testing.assert_array_equal(history[t][decided], history[t - 1][decided])


def test_known_tokens_are_bit_identical_and_counts_follow_their_number():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (B, N)).astype(np.int32)
    region = box_to_token_mask((0, 8, 8, 12), (16, 24), (4, 6))  # 8x12 pixels of a 16x24 image, 4x6 tokens
    tokens[:, np.asarray(region)] = V
    final, history = decode(jnp.asarray(tokens), jax.random.key(2), fixed_logits_fn(1), 4, "cosine", mask_id=V)
    np.testing.assert_array_equal(np.asarray(final)[:, ~np.asarray(region)], tokens[:, ~np.asarray(region)])
    assert np.all(np.asarray(final) != V)
    n0 = int(np.asarray(region).sum())
    want = official_counts(lambda r: math.cos(math.pi / 2 * r), n0, 4)
    np.testing.assert_array_equal((np.asarray(history) == V).sum(-1)[:, 0], want)


def test_keeps_the_most_confident_tokens_without_choice_noise():
    """choice_temperature=0 and near-greedy sampling: after each step the decoded tokens are exactly those with the
    highest model probability of their sample, computed here independently from the logits."""
    fn = fixed_logits_fn(3, scale=4.0)
    current = jnp.full((1, N), V, jnp.int32)
    _, history = decode(current, jax.random.key(4), fn, 6, "cosine", mask_id=V, choice_temperature=0.0,
                        temperature=1e-4)
    history = np.asarray(history)
    previous = np.full((N,), V)
    for t in range(6):
        logits = np.asarray(fn(jnp.asarray(previous[None])))[0, :, :V].astype(np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        greedy = logits.argmax(-1)
        confidence = log_probs[np.arange(N), greedy]
        unknown = previous == V
        newly = unknown & (history[t, 0] != V)
        still = history[t, 0] == V
        assert newly.any()
        if still.any():
            assert confidence[newly].min() >= confidence[still].max() - 1e-6
        np.testing.assert_array_equal(history[t, 0][newly], greedy[newly])
        previous = history[t, 0]


def test_guidance_is_the_published_combination():
    cond, uncond = fixed_logits_fn(5), fixed_logits_fn(6)
    start = jnp.full((B, N), V, jnp.int32)
    key = jax.random.key(7)
    w = 2.5
    guided, _ = decode(start, key, cond, 5, "cosine", mask_id=V, guidance=Guidance(w, uncond))
    by_hand, _ = decode(start, key, lambda t: (1 + w) * cond(t) - w * uncond(t), 5, "cosine", mask_id=V)
    np.testing.assert_array_equal(np.asarray(guided), np.asarray(by_hand))
    # The linear ramp: w_t = w * t / (T - 1), so the first step sees the conditional logits alone.
    ramped, hist_r = decode(start, key, cond, 5, "cosine", mask_id=V, guidance=Guidance(w, uncond, "linear"))
    _, hist_c = decode(start, key, cond, 5, "cosine", mask_id=V)
    np.testing.assert_array_equal(np.asarray(hist_r)[0], np.asarray(hist_c)[0])


def test_start_iter_resumes_the_schedule():
    start = jnp.full((1, N), V, jnp.int32)
    fn = fixed_logits_fn(8)
    _, full = decode(start, jax.random.key(9), fn, 8, "cosine", mask_id=V)
    _, rest = decode(full[2], jax.random.key(10), fn, 8, "cosine", mask_id=V, start_iter=3)
    assert rest.shape[0] == 5
    assert np.all(np.asarray(rest[-1]) != V)
    decided = np.asarray(full[2]) != V
    np.testing.assert_array_equal(np.asarray(rest[-1])[decided], np.asarray(full[2])[decided])


def test_decode_jits():
    fn = fixed_logits_fn(11)
    jitted = jax.jit(lambda tokens, key: decode(tokens, key, fn, 4, "cosine", mask_id=V))
    a, _ = jitted(jnp.full((2, N), V, jnp.int32), jax.random.key(0))
    b, _ = decode(jnp.full((2, N), V, jnp.int32), jax.random.key(0), fn, 4, "cosine", mask_id=V)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_box_to_token_mask_matches_pixel_overlap():
    rng = np.random.default_rng(1)
    for _ in range(20):
        top, left = rng.integers(0, 32, 2)
        height, width = rng.integers(1, 33 - top), rng.integers(1, 33 - left)
        pixels = np.zeros((32, 32), bool)
        pixels[top:top + height, left:left + width] = True
        want = pixels.reshape(8, 4, 8, 4).any(axis=(1, 3)).reshape(-1)
        got = np.asarray(box_to_token_mask((top, left, height, width), (32, 32), (8, 8)))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=N + 1), "num_steps=25"),
    (dict(schedule="cosin"), "schedule='cosin'"),
    (dict(start_iter=4), "start_iter=4"),
    (dict(top_k=V + 1), "top_k=17"),
    (dict(temperature=0.0), "temperature=0.0"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(num_steps=4, schedule="cosine")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        decode(jnp.full((1, N), V, jnp.int32), jax.random.key(0), fixed_logits_fn(), mask_id=V, **args)


def test_box_outside_the_image_is_named():
    with pytest.raises(ValueError, match=r"box=\(30, 0, 4, 4\)"):
        box_to_token_mask((30, 0, 4, 4), (32, 32), (8, 8))


def test_out_of_range_token_is_named():
    tokens = np.full((2, N), V, np.int32)
    tokens[1, 5] = V + 3
    with pytest.raises(ValueError, match=r"tokens\[1, 5\]=19: token ids must be in \[0, 16\]"):
        decode(jnp.asarray(tokens), jax.random.key(0), fixed_logits_fn(), 4, "cosine", mask_id=V)
    tokens[1, 5] = -1  # the official code's mask id
    with pytest.raises(ValueError, match=r"tokens\[1, 5\]=-1"):
        decode(jnp.asarray(tokens), jax.random.key(0), fixed_logits_fn(), 4, "cosine", mask_id=V)


def test_structure_distance_is_the_row_total_variation():
    from maskjax.decode import structure_distance
    rng = np.random.default_rng(3)
    a = rng.dirichlet(np.ones(6), size=(2, 6))
    g = rng.dirichlet(np.ones(6), size=(1, 6))
    want = np.array([[0.5 * np.abs(a[b, i] - g[0, i]).sum() for i in range(6)] for b in range(2)])
    np.testing.assert_allclose(np.asarray(structure_distance(jnp.asarray(a), jnp.asarray(g))), want, rtol=1e-6)


def test_a_dominant_penalty_decides_which_tokens_are_kept():
    """MaskSketch's mechanism: tokens with a large structure penalty are re-masked first, whatever their
    confidence; here the first step's decoded tokens all come from the unpenalised positions."""
    allowed = np.zeros(N, bool)
    allowed[::3] = True
    penalty = lambda sampled: jnp.where(jnp.asarray(allowed)[None], 0.0, 1e4) * jnp.ones(sampled.shape)
    _, history = decode(jnp.full((B, N), V, jnp.int32), jax.random.key(5), fixed_logits_fn(2), 6, "cosine",
                        mask_id=V, penalty_fn=penalty)
    first = np.asarray(history[0]) != V
    assert first.any() and not first[:, ~allowed].any()


def test_structure_guided_decode_revises_tokens_whose_structure_differs():
    """A toy structure: token i's attention row points at itself when it equals the guide's token, elsewhere when
    not, so its structure distance is 0 or 1. The model samples either code with probability 1/2; re-masking by
    structure distance must end with far fewer tokens off the guide than re-masking by confidence alone."""
    import math

    from maskjax.decode import structure_guided_decode
    from maskjax.decode.masksketch import remask_counts
    n, steps = 64, 8
    guide = jnp.asarray(np.random.default_rng(0).integers(0, 2, (1, n)), jnp.int32)
    eye = jnp.eye(n)

    def attention_fn(tokens):
        return jnp.where((tokens == guide)[..., None], eye[None], jnp.roll(eye, 1, axis=1)[None])

    def logits_fn(tokens):
        return jnp.zeros(tokens.shape + (3,))  # codes 0, 1 (and the mask id 2, never sampled)

    counts = remask_counts("cosine", n, steps)
    assert counts == [max(1, math.floor(n * math.cos(math.pi / 2 * (t + 1) / (steps + 1)) + 1e-4))
                      for t in range(steps)]
    off_guide = {}
    for weight in (0.0, 100.0):
        final, history = structure_guided_decode(guide, jax.random.key(1), logits_fn, attention_fn,
                                                 attention_fn(guide), steps, "cosine", mask_id=2,
                                                 structure_weight=weight, choice_temperature=0.0, batch_size=16)
        history = np.asarray(history)
        assert history.shape == (steps, 16, n) and (history < 2).all()
        previous = np.broadcast_to(np.asarray(guide), (16, n))
        for t in range(steps):  # each step changes at most the tokens it re-masked
            assert ((history[t] != previous).sum(-1) <= counts[t]).all()
            previous = history[t]
        off_guide[weight] = float((np.asarray(final) != np.asarray(guide)).sum(-1).mean())
    assert off_guide[100.0] < 0.5 * off_guide[0.0], off_guide
    with pytest.raises(ValueError, match="num_steps=65"):
        structure_guided_decode(guide, jax.random.key(1), logits_fn, attention_fn, attention_fn(guide), 65,
                                mask_id=2)
