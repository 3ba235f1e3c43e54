"""MaskGIT's parallel decoding (Chang et al. 2022, google-research/maskgit `libml/parallel_decode.py`).

Tokens [B, N] int32 hold codebook ids in [0, mask_id) and `mask_id` (= codebook size, never -1) where unknown.
Each step predicts every token, samples the unknown ones, scores each sample's confidence as
log p(sample) + choice_temperature * (1 - (t + 1) / T) * Gumbel noise, keeps the most confident and masks the rest
again, so that `maskjax.masking.schedules.masked_after_step` tokens stay masked (the schedule's count, at least one
decoded per step, none left after the last). Known tokens are never re-masked nor changed, so editing (inpainting,
outpainting, regenerating a region) is decoding from tokens whose edited region is masked.

Example::

    logits_fn = lambda tokens: model.apply(params, tokens, labels)          # [B, N] -> [B, N, V >= mask_id]
    final, steps = decode(jnp.full((8, 64), 1024), key, logits_fn, num_steps=8, schedule="cosine", mask_id=1024)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from maskjax.masking.schedules import check_schedule, masked_after_step

LogitsFn = Callable[[jax.Array], jax.Array]
GUIDANCE_RAMPS = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: logits = (1 + w) * cond - w * uncond, with w = `scale` at every step ('constant')
    or rising linearly from 0 at the first step to `scale` at the last ('linear', Halton-MaskGIT's ramp).
    `uncond_logits_fn(tokens) -> [B, N, V]` gives the logits with the null class."""

    scale: float
    uncond_logits_fn: LogitsFn
    ramp: str = "constant"

    def weight(self, step: jax.Array, num_steps: int) -> jax.Array:
        if self.ramp == "constant" or num_steps == 1:
            return jnp.asarray(self.scale, jnp.float32)
        return self.scale * jnp.asarray(step, jnp.float32) / (num_steps - 1)


def check_decode_args(tokens_shape: tuple, num_steps: int, schedule: str, start_iter: int = 0,
                      guidance: Optional[Guidance] = None, temperature: float = 1.0, top_k: int = 0,
                      codebook_size: Optional[int] = None) -> None:
    """ValueErrors naming the bad argument, before any compute."""
    check_schedule(schedule)
    if len(tokens_shape) != 2:
        raise ValueError(f"tokens: expected [batch, num_tokens], got shape {tuple(tokens_shape)}")
    num_tokens = tokens_shape[1]
    if not 1 <= num_steps <= num_tokens:
        raise ValueError(f"num_steps={num_steps}: must be in [1, {num_tokens}] (the number of tokens; every step "
                         f"decodes at least one)")
    if not 0 <= start_iter < num_steps:
        raise ValueError(f"start_iter={start_iter}: must be in [0, num_steps={num_steps})")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if top_k < 0 or (codebook_size is not None and top_k > codebook_size):
        raise ValueError(f"top_k={top_k}: must be in [0, {codebook_size}] (0 = off)")
    if guidance is not None and guidance.ramp not in GUIDANCE_RAMPS:
        raise ValueError(f"guidance.ramp={guidance.ramp!r}: must be one of {GUIDANCE_RAMPS}")


def _filter_top_k(logits: jax.Array, top_k: int) -> jax.Array:
    if top_k <= 0:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def decode(tokens: jax.Array, rng: jax.Array, logits_fn: LogitsFn, num_steps: int, schedule: str = "cosine", *,
           mask_id: int, choice_temperature: float = 4.5, start_iter: int = 0, guidance: Optional[Guidance] = None,
           temperature: float = 1.0, top_k: int = 0,
           penalty_fn: Optional[Callable[[jax.Array], jax.Array]] = None) -> tuple[jax.Array, jax.Array]:
    """Decode the masked tokens of `tokens` int32 [B, N] in `num_steps - start_iter` steps.

    logits_fn: int32 [B, N] -> float [B, N, V] with V >= mask_id (columns from `mask_id` on are ignored).
    mask_id: the id marking unknown tokens; codebook ids are [0, mask_id).
    penalty_fn: optional, int32 [B, N] (the step's full sample) -> float [B, N] subtracted from the confidence of
      the newly sampled tokens (MaskSketch's structure distance, `maskjax.decode.masksketch`).
    start_iter: resume a schedule of `num_steps` at this step (steps before it are taken as done).
    temperature / top_k: of the sampling; the confidence uses the model's (guided) log-probabilities.
    Returns (final tokens int32 [B, N] with no mask left, every step's tokens int32 [num_steps - start_iter, B, N]
    after its re-masking; the last equals the final tokens). Pure and jit-able (num_steps, schedule, start_iter,
    top_k static).
    """
    tokens = jnp.asarray(tokens)
    check_decode_args(tokens.shape, num_steps, schedule, start_iter, guidance, temperature, top_k, mask_id)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: expected integer ids, got dtype {tokens.dtype}")
    if not isinstance(tokens, jax.core.Tracer):  # concrete input: name an out-of-range id before decoding
        values = np.asarray(tokens)
        bad = np.argwhere((values < 0) | (values > mask_id))
        if len(bad):
            i, j = (int(x) for x in bad[0])
            raise ValueError(f"tokens[{i}, {j}]={int(values[i, j])}: token ids must be in [0, {mask_id}] (codes "
                             f"0..{mask_id - 1}, mask id {mask_id})")
    tokens = tokens.astype(jnp.int32)
    masked_at_start = jnp.sum(tokens == mask_id, axis=-1)

    def step(carry, t):
        current, key = carry
        key, sample_key, choice_key = jax.random.split(key, 3)
        unknown = current == mask_id
        logits = logits_fn(current)[..., :mask_id].astype(jnp.float32)
        if guidance is not None:
            w = guidance.weight(t, num_steps)
            uncond = guidance.uncond_logits_fn(current)[..., :mask_id].astype(jnp.float32)
            logits = (1.0 + w) * logits - w * uncond
        sampled = jax.random.categorical(sample_key, _filter_top_k(logits / temperature, top_k))
        sampled = jnp.where(unknown, sampled, current)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        confidence = jnp.take_along_axis(log_probs, sampled[..., None], axis=-1)[..., 0]
        ratio = (t.astype(jnp.float32) + 1.0) / num_steps
        confidence = confidence + choice_temperature * (1.0 - ratio) * jax.random.gumbel(choice_key, sampled.shape)
        if penalty_fn is not None:
            confidence = confidence - penalty_fn(sampled).astype(jnp.float32)
        confidence = jnp.where(unknown, confidence, jnp.inf)
        keep_masked = masked_after_step(schedule, t, num_steps, masked_at_start, jnp.sum(unknown, axis=-1))
        # Exact counts even with tied confidences: rank the tokens, mask the `keep_masked` least confident.
        ranks = jnp.argsort(jnp.argsort(confidence, axis=-1, stable=True), axis=-1, stable=True)
        remask = ranks < keep_masked[:, None]
        following = jnp.where(remask, mask_id, sampled).astype(jnp.int32)
        return (following, key), following

    (final, _), history = jax.lax.scan(step, (tokens, rng), jnp.arange(start_iter, num_steps, dtype=jnp.int32))
    return final, history


def box_to_token_mask(box: tuple[int, int, int, int], image_hw: tuple[int, int],
                      grid_hw: tuple[int, int]) -> jax.Array:
    """bool [gh * gw]: the tokens whose image cell overlaps the pixel box (top, left, height, width) of an image
    of `image_hw`, in row-major token order. ValueError naming the box when it is empty or leaves the image."""
    top, left, height, width = (int(v) for v in box)
    img_h, img_w = image_hw
    if height < 1 or width < 1 or top < 0 or left < 0 or top + height > img_h or left + width > img_w:
        raise ValueError(f"box={tuple(box)} (top, left, height, width): must be non-empty and inside the "
                         f"{img_h}x{img_w} image")
    gh, gw = grid_hw
    if img_h % gh or img_w % gw:
        raise ValueError(f"image {img_h}x{img_w} is not a multiple of the token grid {gh}x{gw}")
    cell_h, cell_w = img_h // gh, img_w // gw
    rows = jnp.arange(gh)
    cols = jnp.arange(gw)
    row_hit = (rows * cell_h < top + height) & ((rows + 1) * cell_h > top)
    col_hit = (cols * cell_w < left + width) & ((cols + 1) * cell_w > left)
    return (row_hit[:, None] & col_hit[None, :]).reshape(-1)
