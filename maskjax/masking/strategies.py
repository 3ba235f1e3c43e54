"""Masking strategies for masked image modeling: ``strategy(key, batch, grid, ratio, **options) -> MaskingResult``.

All are pure and ``jit``-able (key, scores and schedule values may be traced; ``batch``, the grid,
``ratio`` and the other options are static), mask the same exact number of tokens in every sample,
and are deterministic per key. ``key`` is one PRNG key (row ``i`` then uses ``fold_in(key, i)``) or a
batch of per-example keys from ``masking_key(seed, step, index=example_ids)``.

Strategies (masked tokens per sample; r = ratio, N = tokens):

- ``random``: MAE, the tokens with the largest uniform noise; round(r * N).
- ``block``: BEiT, random rectangles of random area / aspect, then a contiguous fill; round(r * N).
- ``grid``: ConvMAE, whole cells of c = ch * cw patches (coarse random, upsampled); round(r * N / c) * c.
- ``tube``: VideoMAE, one spatial mask repeated over all T frames; round(r * H * W) * T.
- ``attention``: AttMask, the top- ("high") or bottom- ("low") scoring tokens, optionally part random; round(r * N).
- ``hard_patch``: HPM, the hardest ``alpha`` fraction by predicted loss, the rest random; round(r * N).
- ``noise``: ColorMAE, the top of low / high / band-pass filtered noise; round(r * N).
- ``checkerboard``: symmetric masking, one colour of a (cell-sized) chessboard at random; N / 2 (r = 0.5).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from maskjax.masking.core import (MaskingResult, check_batch, check_choice, check_fraction, check_grid,
                                  check_scores, example_keys, inverse_permutation, mask_from_scores,
                                  num_masked_tokens, split_keys, uniform_noise, upsample_mask)

GridHW = Tuple[int, int]


def _any_grid(grid_hw: Any) -> Tuple[int, ...]:
    """A grid of any rank (token-wise strategies only need N = prod(grid))."""
    try:
        ndim = len(grid_hw)
    except TypeError:
        ndim = 2
    return check_grid(grid_hw, max(ndim, 1))


def random_masking(key: jax.Array, batch: int, grid_hw: Sequence[int], ratio: float, *,
                   order: str = "sorted") -> MaskingResult:
    """MAE random masking: argsort of uniform noise; the ``round(ratio * N)`` noisiest tokens are masked.

    ``grid_hw`` may have any number of dims (only N = prod(grid_hw) matters). ``order="shuffle"`` gives
    MAE's shuffle order for ``ids_keep`` / ``ids_masked`` (see ``mask_from_scores``).

    Example::

        res = random_masking(jax.random.key(0), 8, (14, 14), 0.75)   # 147 of 196 masked per row
    """
    batch = check_batch(batch)
    grid = _any_grid(grid_hw)
    num_tokens = math.prod(grid)
    num_masked = num_masked_tokens(num_tokens, ratio)
    check_choice(order, "order", ("sorted", "shuffle"))
    noise = uniform_noise(example_keys(key, batch), num_tokens)
    return mask_from_scores(noise, num_masked, order=order)


# ----------------------------------------------------------------------------------------------
# block-wise (BEiT)


def _neighbour_count(mask_hw: jax.Array) -> jax.Array:
    """Number of masked 4-neighbours of every cell of a bool [..., H, W] mask (zero padding)."""
    m = mask_hw.astype(jnp.int32)
    pad = jnp.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)])
    return pad[..., :-2, 1:-1] + pad[..., 2:, 1:-1] + pad[..., 1:-1, :-2] + pad[..., 1:-1, 2:]


def _check_block_options(grid: GridHW, num_masked: int, min_num_patches: int, max_num_patches: Optional[int],
                         min_aspect: float, max_aspect: Optional[float], max_attempts: int):
    h, w = grid
    if isinstance(min_num_patches, bool) or not isinstance(min_num_patches, (numbers.Integral, np.integer)) \
            or min_num_patches < 1:
        raise ValueError(f"min_num_patches must be a positive int, got min_num_patches={min_num_patches!r}")
    if min_num_patches > num_masked:
        raise ValueError(f"min_num_patches={min_num_patches} exceeds the {num_masked} tokens to mask on "
                         f"grid_hw={grid}: lower min_num_patches or raise ratio")
    if max_num_patches is not None and (isinstance(max_num_patches, bool) or not isinstance(
            max_num_patches, (numbers.Integral, np.integer)) or max_num_patches < min_num_patches):
        raise ValueError(f"max_num_patches must be None or an int >= min_num_patches={min_num_patches}, "
                         f"got max_num_patches={max_num_patches!r}")
    if not isinstance(min_aspect, numbers.Real) or not min_aspect > 0:
        raise ValueError(f"min_aspect must be a positive number, got min_aspect={min_aspect!r}")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    if not isinstance(max_aspect, numbers.Real) or not max_aspect >= min_aspect:
        raise ValueError(f"max_aspect must be >= min_aspect={min_aspect}, got max_aspect={max_aspect!r}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, (numbers.Integral, np.integer)) \
            or max_attempts < 1:
        raise ValueError(f"max_attempts must be a positive int, got max_attempts={max_attempts!r}")
    # Some block of at least min_num_patches tokens with an allowed aspect (h / w) must fit the grid.
    fits = any(bh * bw >= min_num_patches and min_aspect * 0.999 <= bh / bw <= max_aspect * 1.001
               for bh in range(1, h + 1) for bw in range(1, w + 1))
    if not fits:
        raise ValueError(f"grid_hw={grid} is too small for blocks of min_num_patches={min_num_patches} "
                         f"with aspect ratios in [{min_aspect:.3g}, {max_aspect:.3g}]")
    return float(max_aspect)


def block_masking(key: jax.Array, batch: int, grid_hw: Sequence[int], ratio: float, *,
                  min_num_patches: int = 4, max_num_patches: Optional[int] = None, min_aspect: float = 0.3,
                  max_aspect: Optional[float] = None, max_attempts: int = 10) -> MaskingResult:
    """BEiT block-wise masking, made exact and ``jit``-able.

    BEiT's ``MaskingGenerator`` loop runs in a ``lax.while_loop`` per sample: draw a target area
    ``U(min_num_patches, min(remaining, max_num_patches))`` and a log-uniform aspect ratio in
    ``[min_aspect, max_aspect]`` (default ``1 / min_aspect``), place the ``h x w`` rectangle uniformly,
    accept it if it adds between 1 and ``remaining`` new tokens (so the count never overshoots); stop
    at the target or after ``max_attempts`` consecutive rejections. BEiT may then stop short; here the
    shortfall is filled with the unmasked tokens that have the most masked 4-neighbours (ties random),
    so masks stay contiguous and the count is exactly ``round(ratio * H * W)``. Unlike BEiT, a block may
    span the full grid height or width (BEiT requires ``h < H`` and ``w < W``).
    BEiT-v1 pre-training used ``ratio=75/196, min_num_patches=16``.

    Example::

        res = block_masking(jax.random.key(0), 8, (14, 14), 0.4, min_num_patches=16)
    """
    batch = check_batch(batch)
    grid = check_grid(grid_hw, 2)
    h, w = grid
    num_masked = num_masked_tokens(h * w, ratio)
    max_aspect = _check_block_options(grid, num_masked, min_num_patches, max_num_patches, min_aspect, max_aspect,
                                      max_attempts)
    max_patches = num_masked if max_num_patches is None else min(int(max_num_patches), num_masked)
    priority = _block_priority(example_keys(key, batch), grid=grid, num_masked=num_masked,
                               min_num_patches=int(min_num_patches), max_patches=max_patches,
                               log_aspect=(math.log(min_aspect), math.log(max_aspect)), max_attempts=int(max_attempts))
    return mask_from_scores(priority, num_masked)


# Compiled once per static configuration, so eager callers do not re-trace the while_loop every call.
@functools.partial(jax.jit, static_argnames=("grid", "num_masked", "min_num_patches", "max_patches", "log_aspect",
                                             "max_attempts"))
def _block_priority(keys: jax.Array, *, grid: GridHW, num_masked: int, min_num_patches: int, max_patches: int,
                    log_aspect: Tuple[float, float], max_attempts: int) -> jax.Array:
    """Priority [B, H*W] whose top ``num_masked`` entries are BEiT's blocks plus the contiguous fill."""
    h, w = grid
    rows = jnp.arange(h, dtype=jnp.int32)[:, None]
    cols = jnp.arange(w, dtype=jnp.int32)[None, :]

    def one_sample(sample_key):
        def cond(state):
            _, count, failures, _ = state
            return (count < num_masked) & (failures < max_attempts)

        def body(state):
            mask, count, failures, k = state
            k, k_area, k_aspect, k_top, k_left = jax.random.split(k, 5)
            remaining = num_masked - count
            upper = jnp.minimum(remaining, max_patches).astype(jnp.float32)
            # BEiT's random.uniform(min_num_patches, upper); upper may be below the minimum near the end.
            area = min_num_patches + jax.random.uniform(k_area, (), jnp.float32) * (upper - min_num_patches)
            aspect = jnp.exp(jax.random.uniform(k_aspect, (), jnp.float32, *log_aspect))
            bh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
            bw = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
            fits = (bh >= 1) & (bw >= 1) & (bh <= h) & (bw <= w)
            top = jax.random.randint(k_top, (), 0, jnp.maximum(h - bh, 0) + 1)
            left = jax.random.randint(k_left, (), 0, jnp.maximum(w - bw, 0) + 1)
            block = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
            new = block & ~mask
            delta = new.sum(dtype=jnp.int32)
            accept = fits & (delta > 0) & (delta <= remaining)
            mask = jnp.where(accept, mask | block, mask)
            count = count + jnp.where(accept, delta, 0)
            failures = jnp.where(accept, 0, failures + 1)
            return mask, count, failures, k

        k_loop, k_fill = jax.random.split(sample_key)
        init = (jnp.zeros((h, w), bool), jnp.int32(0), jnp.int32(0), k_loop)
        mask, _, _, _ = jax.lax.while_loop(cond, body, init)
        # Priority levels: placed blocks (>= 8) > unmasked tokens by masked-neighbour count (0..4) + noise.
        fill_noise = jax.random.uniform(k_fill, (h, w), jnp.float32)
        priority = 8.0 * mask + _neighbour_count(mask) + fill_noise
        return priority.reshape(h * w)

    return jax.vmap(one_sample)(keys)


# ----------------------------------------------------------------------------------------------
# grid / block-aligned (ConvMAE)


def _pair(value: Any, name: str) -> Tuple[int, int]:
    if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    return check_grid(value, 2, name)


def grid_masking(key: jax.Array, batch: int, grid_hw: Sequence[int], ratio: float, *,
                 cell: Union[int, Sequence[int]] = 2) -> MaskingResult:
    """ConvMAE-style block-aligned masking: random masking of ``cell`` (int or (ch, cw)) patch cells on the
    coarse grid ``(H / ch, W / cw)``, upsampled to ``grid_hw``. The ratio is exact at the coarse level:
    ``round(ratio * Hc * Wc) * ch * cw`` tokens are masked (e.g. 14x14, cell 2, ratio 0.75: 37 * 4 = 148).
    For ConvMAE itself, draw ``random_masking`` on the stage-3 grid and ``upsample_mask`` it for the conv
    stages; this strategy is the same with the fine grid as the token grid.

    Example::

        res = grid_masking(jax.random.key(0), 8, (14, 14), 0.75, cell=2)  # masks whole 2x2 cells
    """
    batch = check_batch(batch)
    h, w = check_grid(grid_hw, 2)
    ch, cw = _pair(cell, "cell")
    if h % ch or w % cw:
        raise ValueError(f"grid_hw={(h, w)} is not divisible by cell={(ch, cw)}")
    hc, wc = h // ch, w // cw
    if hc * wc < 2:
        raise ValueError(f"grid_hw={(h, w)} with cell={(ch, cw)} leaves {hc * wc} coarse cell(s); need at least 2")
    num_masked_coarse = num_masked_tokens(hc * wc, ratio)
    noise = uniform_noise(example_keys(key, batch), hc * wc)
    coarse = mask_from_scores(noise, num_masked_coarse).mask
    fine = upsample_mask(coarse, (hc, wc), (ch, cw))
    return mask_from_scores(fine.astype(jnp.float32), num_masked_coarse * ch * cw)


# ----------------------------------------------------------------------------------------------
# tube (VideoMAE)


def tube_masking(key: jax.Array, batch: int, grid_thw: Sequence[int], ratio: float, *,
                 spatial: str = "random", spatial_options: Optional[Mapping[str, Any]] = None) -> MaskingResult:
    """VideoMAE tube masking: one spatial mask on ``(H, W)`` (strategy ``spatial``, default random)
    repeated over all ``T`` frames. Tokens are ordered ``t * H * W + h * W + w``; every frame masks
    ``round(ratio * H * W)`` tokens, ``T`` times that in total.

    Example::

        res = tube_masking(jax.random.key(0), 2, (8, 14, 14), 0.9)   # VideoMAE's 90% tubes
        res.mask.reshape(2, 8, 196)[:, 0] == res.mask.reshape(2, 8, 196)[:, 5]   # all True
    """
    batch = check_batch(batch)
    t, h, w = check_grid(grid_thw, 3, "grid_thw")
    if spatial == "tube" or spatial not in STRATEGIES:
        allowed = tuple(s for s in STRATEGIES if s != "tube")
        raise ValueError(f"spatial must be one of {allowed}, got spatial={spatial!r}")
    spatial_res = STRATEGIES[spatial](key, batch, (h, w), ratio, **dict(spatial_options or {}))
    frames = jnp.broadcast_to(spatial_res.mask[:, None, :], (batch, t, h * w)).reshape(batch, t * h * w)
    return mask_from_scores(frames.astype(jnp.float32), spatial_res.num_masked * t)


# ----------------------------------------------------------------------------------------------
# score-guided: attention (AttMask) and hard patches (HPM)


def _guided_priority(key: jax.Array, batch: int, scores: jax.Array, num_guided) -> jax.Array:
    """Priority [B, N]: the ``num_guided`` top-scoring tokens (ties broken at random) get 2, the rest
    independent uniform noise in [0, 1), so the remaining masked tokens are drawn at random."""
    k_tie, k_fill = split_keys(example_keys(key, batch), 2)
    num_tokens = scores.shape[1]
    tie = uniform_noise(k_tie, num_tokens)
    fill = uniform_noise(k_fill, num_tokens)
    order = jnp.lexsort((tie, -scores), axis=-1)       # descending score, random among equal scores
    rank = inverse_permutation(order.astype(jnp.int32))
    return jnp.where(rank < num_guided, 2.0, fill)


def attention_masking(key: jax.Array, batch: int, grid_hw: Sequence[int], ratio: float, *,
                      scores: jax.Array, mode: str = "high", random_fraction: Any = 0.0) -> MaskingResult:
    """AttMask: mask by per-token ``scores`` [B, N] (e.g. the teacher's [CLS] attention, averaged over heads).

    ``mode="high"`` masks the highest-scoring tokens (AttMask-High), ``"low"`` the lowest-scoring ones
    (AttMask-Low: the salient tokens stay visible). ``random_fraction`` (may be traced) of the
    ``round(ratio * N)`` masked tokens, ``round(random_fraction * num_masked)``, are instead drawn at random
    from the tokens the scores did not select. Equal scores are broken at random.

    Example::

        cls_attn = attn[:, :, 0, 1:].mean(1)          # [B, N] from a teacher's last block
        res = attention_masking(key, B, (14, 14), 0.5, scores=cls_attn, mode="high")
    """
    batch = check_batch(batch)
    grid = _any_grid(grid_hw)
    num_tokens = math.prod(grid)
    num_masked = num_masked_tokens(num_tokens, ratio)
    check_choice(mode, "mode", ("high", "low"))
    random_fraction = check_fraction(random_fraction, "random_fraction")
    scores = check_scores(scores, batch, num_tokens)
    num_random = jnp.round(jnp.asarray(random_fraction, jnp.float32) * num_masked).astype(jnp.int32)
    signed = scores if mode == "high" else -scores
    return mask_from_scores(_guided_priority(key, batch, signed, num_masked - num_random), num_masked)


def hard_patch_alpha(step: Any, total_steps: int, alpha_max: float = 0.5) -> jax.Array:
    """HPM's easy-to-hard schedule: ``alpha_t = (step + 1) / total_steps * alpha_max`` (HPM counts epochs;
    any progress counter works). Traced ``step`` is fine; the result is a float32 scalar."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, (numbers.Integral, np.integer)) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got total_steps={total_steps!r}")
    check_fraction(alpha_max, "alpha_max")
    return jnp.clip((jnp.asarray(step, jnp.float32) + 1.0) / total_steps, 0.0, 1.0) * alpha_max


def hard_patch_masking(key: jax.Array, batch: int, grid_hw: Sequence[int], ratio: float, *,
                       scores: jax.Array, alpha: Any) -> MaskingResult:
    """Hard Patches Mining: ``scores`` [B, N] are the predicted per-patch reconstruction losses (difficulty).
    Of the ``round(ratio * N)`` masked tokens, ``floor(alpha * num_masked)`` (HPM's ``int(...)``) are the
    hardest ones and the rest are random among the others. ``alpha`` may be traced, so the schedule
    ``hard_patch_alpha(step, total)`` (0 -> 0.5 in HPM) runs inside one compiled step.

    Example::

        alpha = hard_patch_alpha(step, total_steps)         # easy-to-hard
        res = hard_patch_masking(key, B, (14, 14), 0.75, scores=jax.lax.stop_gradient(pred_loss), alpha=alpha)
    """
    batch = check_batch(batch)
    grid = _any_grid(grid_hw)
    num_tokens = math.prod(grid)
    num_masked = num_masked_tokens(num_tokens, ratio)
    alpha = check_fraction(alpha, "alpha")
    scores = check_scores(scores, batch, num_tokens)
    # The small epsilon keeps float32 products such as 0.3 * 10 from flooring to 2.
    num_hard = jnp.floor(jnp.asarray(alpha, jnp.float32) * num_masked + 1e-4).astype(jnp.int32)
    return mask_from_scores(_guided_priority(key, batch, scores, num_hard), num_masked)


# ----------------------------------------------------------------------------------------------
# filtered noise (ColorMAE)

NOISE_COLORS = ("white", "red", "blue", "green", "purple")


def filter_noise(noise: jax.Array, color: str, sigma: float = 1.0, sigma_ratio: float = 2.0) -> jax.Array:
    """Filter white noise [B, H, W] with a circular (FFT) Gaussian filter of ``sigma`` tokens:
    red = low-pass ``G_s * n``, blue = high-pass ``n - G_s * n``, green = band-pass
    ``G_s * n - G_{k s} * n`` (difference of Gaussians, k = ``sigma_ratio``), purple = band-stop
    ``n - green``, white = ``n``."""
    check_choice(color, "color", NOISE_COLORS)
    if color == "white":
        return noise
    h, w = noise.shape[-2:]
    fy = jnp.fft.fftfreq(h)[:, None]
    fx = jnp.fft.fftfreq(w)[None, :]
    f2 = fy ** 2 + fx ** 2

    def gauss(s):  # frequency response of a spatial Gaussian of std s (in tokens)
        return jnp.exp(-2.0 * (jnp.pi ** 2) * (s ** 2) * f2)

    response = {"red": gauss(sigma), "blue": 1.0 - gauss(sigma),
                "green": gauss(sigma) - gauss(sigma * sigma_ratio),
                "purple": 1.0 - gauss(sigma) + gauss(sigma * sigma_ratio)}[color]
    return jnp.real(jnp.fft.ifft2(jnp.fft.fft2(noise) * response)).astype(jnp.float32)


def noise_masking(key: jax.Array, batch: int, grid_hw: Sequence[int], ratio: float, *, color: str = "green",
                  sigma: float = 1.0, sigma_ratio: float = 2.0) -> MaskingResult:
    """ColorMAE-style data-independent masks: white noise filtered by ``filter_noise`` (``color`` red =
    low-pass: blobs; blue = high-pass: evenly spread; green = band-pass; purple = band-stop;
    white = MAE random), then the ``round(ratio * N)`` largest values are masked. The filter is circular,
    so blobs wrap around the grid edges. ColorMAE found green best; it crops masks from precomputed
    larger noise textures, here fresh noise is filtered per sample.

    Example::

        res = noise_masking(jax.random.key(0), 8, (14, 14), 0.75, color="red", sigma=1.5)
    """
    batch = check_batch(batch)
    h, w = check_grid(grid_hw, 2)
    num_masked = num_masked_tokens(h * w, ratio)
    check_choice(color, "color", NOISE_COLORS)
    if not isinstance(sigma, numbers.Real) or not sigma > 0:
        raise ValueError(f"sigma must be a positive number of tokens, got sigma={sigma!r}")
    if not isinstance(sigma_ratio, numbers.Real) or not sigma_ratio > 1:
        raise ValueError(f"sigma_ratio must be a number > 1, got sigma_ratio={sigma_ratio!r}")
    noise = uniform_noise(example_keys(key, batch), h * w).reshape(batch, h, w)
    filtered = filter_noise(noise, color, float(sigma), float(sigma_ratio))
    return mask_from_scores(filtered.reshape(batch, h * w), num_masked)


# ----------------------------------------------------------------------------------------------
# checkerboard (symmetric masking)


def checkerboard_masking(key: jax.Array, batch: int, grid_hw: Sequence[int], ratio: float = 0.5, *,
                         cell: Union[int, Sequence[int]] = 1) -> MaskingResult:
    """Symmetric (checkerboard) masking: cells of ``cell`` patches coloured like a chessboard; each sample
    masks one colour, chosen at random, so every token is visible in one of the two complementary masks.
    Exactly half the tokens: ``ratio`` must be 0.5 and the coarse grid must have an even number of cells.

    Example::

        res = checkerboard_masking(jax.random.key(0), 8, (14, 14), 0.5)   # 98 of 196, one of 2 phases
    """
    batch = check_batch(batch)
    h, w = check_grid(grid_hw, 2)
    ch, cw = _pair(cell, "cell")
    if not _is_half(ratio):
        raise ValueError(f"checkerboard masking masks exactly half the tokens: ratio must be 0.5, got ratio={ratio!r}")
    if h % ch or w % cw:
        raise ValueError(f"grid_hw={(h, w)} is not divisible by cell={(ch, cw)}")
    hc, wc = h // ch, w // cw
    if (hc * wc) % 2:
        raise ValueError(f"grid_hw={(h, w)} with cell={(ch, cw)} has an odd number ({hc * wc}) of cells: "
                         f"the two colours would differ in size")
    colour = ((np.arange(hc)[:, None] + np.arange(wc)[None, :]) % 2).astype(bool)
    colour = np.kron(colour, np.ones((ch, cw), bool)).reshape(1, h * w)
    phase = jax.vmap(lambda k: jax.random.bernoulli(k))(example_keys(key, batch))[:, None]
    mask = jnp.logical_xor(jnp.asarray(colour), phase)
    return mask_from_scores(mask.astype(jnp.float32), h * w // 2)


def _is_half(ratio: Any) -> bool:
    return isinstance(ratio, (numbers.Real, np.floating)) and not isinstance(ratio, bool) and float(ratio) == 0.5


STRATEGIES = {
    "random": random_masking,
    "block": block_masking,
    "grid": grid_masking,
    "tube": tube_masking,
    "attention": attention_masking,
    "hard_patch": hard_patch_masking,
    "noise": noise_masking,
    "checkerboard": checkerboard_masking,
}
