"""Gallery of the mask kinds' dense patterns -> docs/masks.png.

    python experiments/mask_gallery.py            # ~10 s on a laptop CPU

Each panel is ``mask.materialize(n, n)`` (white = may attend, rows = queries, columns = keys) with the
block grid of a (16, 16) block map drawn over it and the block density in the title.
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maskjax.attention import masks as M  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "masks.png")


def panels():
    n = 64
    rng = np.random.default_rng(0)
    seg = np.repeat(np.arange(4), [10, 22, 12, 20])[None]
    groups = np.repeat(np.arange(3), [24, 24, 16])[None]          # audio, video, fusion (Zorro)
    zorro = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1]], bool)
    blobs = np.zeros((1, n, n), bool)
    for i in range(n):
        c = rng.integers(0, n)
        blobs[0, i, max(0, c - 6):c + 6] = i % 5 != 0            # every 5th query predicts nothing
    grid_row = M.TokenGrid(8, 8)
    grid_tile = M.TokenGrid(8, 8, tile=(4, 4))
    grid_cls = M.TokenGrid(7, 9, num_prefix=1)
    return [
        ("full()", M.full(), n, 1, 0),
        ("causal()", M.causal(), n, 1, 0),
        ("prefix_lm(20)", M.prefix_lm(20), n, 1, 0),
        ("local_1d(left=8, right=2)", M.local_1d(left=8, right=2), n, 1, 0),
        ("causal() & local_1d(16)\n| segment_ids", (M.causal() & M.local_1d(left=16)) | M.segment_ids(seg), n, 1, 0),
        ("window_2d 8x8 r=1 (row order)", M.window_2d(grid_row, radius=(1, 1)), n, 1, 0),
        ("window_2d 8x8 r=1 (4x4 tiles)", M.window_2d(grid_tile, radius=(1, 1)), n, 1, 0),
        ("window_2d dilation 2, +cls", M.window_2d(grid_cls, radius=(1, 1), dilation=(2, 2)), 64, 1, 0),
        ("Swin shifted windows 4x4", M.window_2d(grid_row, mode="partition", window=(4, 4), shift=(2, 2)), n, 1, 0),
        ("directional_2d head 'right'", M.directional_2d(grid_row, directions=[0, 135], fov=90), n, 2, 0),
        ("directional_2d head 'up-left'", M.directional_2d(grid_row, directions=[0, 135], fov=90), n, 2, 1),
        ("segment_ids (packing)", M.segment_ids(seg), n, 1, 0),
        ("group_routing (Zorro)", M.group_routing(groups, allowed=zorro), n, 1, 0),
        ("lengths(q=50, kv=40)", M.lengths(np.array([50]), np.array([40])), n, 1, 0),
        ("query_masks (Mask2Former,\nfallback_to_all)", M.query_masks(blobs, fallback_to_all=True), n, 1, 0),
        ("function_mask\n|q-k| % 8 == 0", M.function_mask(lambda b, h, q, k: abs(q - k) % 8 == 0), n, 1, 0),
    ]


def main():
    items = panels()
    cols = 4
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.3 * rows))
    for ax, (title, mask, n, heads, head) in zip(axes.flat, items):
        dense = np.broadcast_to(mask.materialize(n, n, heads=heads), (1, heads, n, n))[0, head]
        bm = mask.block_map(n, n, 16, 16, heads=heads)
        density = float(np.asarray(bm.block_density()).reshape(-1)[head if bm.kind.shape[1] > 1 else 0])
        ax.imshow(dense, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for t in range(16, n, 16):
            ax.axhline(t - 0.5, color="tab:red", lw=0.5, alpha=0.6)
            ax.axvline(t - 0.5, color="tab:red", lw=0.5, alpha=0.6)
        ax.set_title(f"{title}\nelem {dense.mean():.2f}, block {density:.2f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.suptitle("maskjax.attention.masks — rows: queries, cols: keys; white = attend; red: 16x16 blocks", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print("wrote", os.path.normpath(OUT))


if __name__ == "__main__":
    sys.exit(main())
