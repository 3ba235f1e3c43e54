"""Gallery of the masking strategies on a 14x14 patch grid -> docs/masking.png.

    python experiments/draw_masking.py            # a few seconds on a laptop CPU

Dark = masked (hidden from the encoder), light = visible. The score-guided strategies (AttMask,
hard patches) use a synthetic score map (a Gaussian "object" plus noise, first panel of row 2) standing
in for a teacher's [CLS] attention / a predicted reconstruction loss. Each title gives the strategy,
its options and the masked count of the 196 tokens.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maskjax import masking as M  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "masking.png")
GRID = (14, 14)


def score_map() -> np.ndarray:
    """A blob around (5, 8) plus a little noise: float32 [1, 196]."""
    yy, xx = np.mgrid[:14, :14]
    blob = np.exp(-((yy - 5.0) ** 2 + (xx - 8.0) ** 2) / (2 * 2.5 ** 2))
    noise = np.random.default_rng(0).random((14, 14)) * 0.15
    return (blob + noise).reshape(1, -1).astype(np.float32)


def panels():
    key = M.masking_key(seed=0, step=0)
    scores = score_map()
    tube = M.tube_masking(key, 1, (2,) + GRID, 0.75).mask.reshape(2, 196)
    rows = [
        [("random (MAE), r=0.75", M.random_masking(key, 1, GRID, 0.75).mask[0]),
         ("block (BEiT), r=0.4, min 16", M.block_masking(key, 1, GRID, 0.4, min_num_patches=16).mask[0]),
         ("grid (ConvMAE), 2x2 cells, r=0.75", M.grid_masking(key, 1, GRID, 0.75, cell=2).mask[0]),
         ("tube (VideoMAE) frame 0, r=0.75", tube[0]),
         ("tube frame 1 (same)", tube[1]),
         ("checkerboard (symmetric)", M.checkerboard_masking(key, 1, GRID, 0.5).mask[0])],
        [("scores (synthetic attention / loss)", scores[0]),
         ("attention high, r=0.5", M.attention_masking(key, 1, GRID, 0.5, scores=scores, mode="high").mask[0]),
         ("attention low, r=0.5", M.attention_masking(key, 1, GRID, 0.5, scores=scores, mode="low").mask[0]),
         ("attention high + 25% random", M.attention_masking(key, 1, GRID, 0.5, scores=scores,
                                                               random_fraction=0.25).mask[0]),
         ("hard patch, r=0.75, alpha=0.5", M.hard_patch_masking(key, 1, GRID, 0.75, scores=scores,
                                                                alpha=0.5).mask[0]),
         ("hard patch, r=0.75, alpha=0.05", M.hard_patch_masking(key, 1, GRID, 0.75, scores=scores,
                                                                 alpha=0.05).mask[0])],
        [(f"noise {c}, r=0.75", M.noise_masking(key, 1, GRID, 0.75, color=c, sigma=s).mask[0])
         for c, s in (("white", 1.0), ("red", 1.0), ("green", 1.0), ("blue", 0.5), ("purple", 1.0))]
        + [("random, another step", M.random_masking(M.masking_key(0, 1), 1, GRID, 0.75).mask[0])],
    ]
    return rows


def main():
    rows = panels()
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.4 * ncols, 2.9 * len(rows)))
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.axis("off")
                continue
            title, values = row[c]
            values = np.asarray(values).reshape(GRID)
            if values.dtype == np.bool_:
                ax.imshow(values, cmap="Greys", vmin=-0.15, vmax=1.1, interpolation="nearest")
                title = f"{title}\n{int(values.sum())}/196 masked"
            else:
                ax.imshow(values, cmap="magma", interpolation="nearest")
                title = f"{title}\n"
            ax.set_title(title, fontsize=7.5)
            # Patch grid lines help to read contiguity.
            ax.set_xticks(np.arange(-0.5, 14, 1), minor=True)
            ax.set_yticks(np.arange(-0.5, 14, 1), minor=True)
            ax.grid(which="minor", color="white", linewidth=0.3)
            ax.tick_params(which="minor", length=0)
    fig.suptitle("maskjax.masking on a 14x14 patch grid (dark = masked)", fontsize=10)
    fig.tight_layout(h_pad=1.2)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print("wrote", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
