"""How much of the object does each masking strategy leave visible? A diagnostic for the strategy study of
`reproduce.py`: for every strategy at ratio 0.75, the share of object patches and of background patches that stay
visible, how often no object patch is visible at all, and where on the grid tokens get masked.

    python experiments/mim/object_visibility.py            # after reproduce.py's strategy study

Object patches: on the built-in shapes, patches at least half covered by the main object (the data set's
instance mask, id 1); on Fashion-MNIST, patches at least half covered by the garment (pixels > 25 of 255). The
score-free strategies (random, block) need no training; the score-guided ones (AttMask, HPM) draw their masks with
the final parameters of their `reproduce.py` run (attention of the trained encoder; HPM's loss predictor at the last
step's hardest share), i.e. the masks of the end of training. Random masking leaves 25 % of any region visible in
expectation: the reference line.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
from configs import mae_builtin, mae_fashion_mnist  # noqa: E402
from maskjax.data.pipeline import make_source  # noqa: E402
from maskjax.data.preprocess import normalize  # noqa: E402
from maskjax.tasks import make_task  # noqa: E402
from maskjax.train.checkpoint import load_params  # noqa: E402

RESULTS = os.path.join(HERE, "results")
CONFIGS = {"builtin_shapes": mae_builtin.get_config, "fashion_mnist": mae_fashion_mnist.get_config}
STRATEGIES = {"random": "random", "block": "block", "attention (AttMask-High)": "attention",
              "hard patches (HPM)": "hard_patch"}
GUIDED = ("attention", "hard_patch")


def object_patches(dataset: str, num_images: int, image_size: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N, H, W, C] in [-1, 1], object bool [N, gh * gw]) of the first `num_images` eval images."""
    split = "validation" if dataset == "builtin_shapes" else "test"
    source = make_source(dataset, split, image_size=image_size)
    batch = source.get_batch(range(num_images)) if hasattr(source, "get_batch") else {
        k: np.stack([source[i][k] for i in range(num_images)]) for k in ("image",)}
    images = batch["image"]
    if dataset == "builtin_shapes":
        foreground = batch["instance"] == 1
    else:
        foreground = images[..., 0] > 25
    n, h, w = foreground.shape
    cover = foreground.reshape(n, h // patch, patch, w // patch, patch).mean((2, 4))
    return normalize(images), (cover >= 0.5).reshape(n, -1)


def run_workdir(root: str, dataset: str, strategy: str) -> str:
    config_name = "mae_builtin" if dataset == "builtin_shapes" else "mae_fashion_mnist"  # as reproduce.py names runs
    return os.path.join(root, f"{dataset}_2000", f"{config_name}_mim.mask_ratio_0.75_mim.masking_{strategy}")


def strategy_masks(dataset: str, strategy: str, images: np.ndarray, workdir: str) -> np.ndarray:
    """bool [N, tokens] masks of `strategy` (True = masked), with the trained run's parameters if it is guided."""
    if strategy in GUIDED:
        with open(os.path.join(workdir, "config.json")) as f:
            config = ml_collections.ConfigDict(json.load(f))
        params, step = load_params(workdir, -1, "", config_key="run")
        params = jax.tree.map(jnp.asarray, params)
    else:
        config = CONFIGS[dataset]()
        config.mim.masking, config.mim.mask_ratio = strategy, 0.75
        params, step = None, config.total_steps
    task = make_task(config, load_params=load_params)
    masks = [np.asarray(task.train_masking(params, jnp.asarray(images[i:i + 256]), jax.random.key(i),
                                           jnp.asarray(step)).mask) for i in range(0, len(images), 256)]
    return np.concatenate(masks)


def summarize(masks: np.ndarray, is_object: np.ndarray) -> dict:
    visible = ~masks
    has_object = is_object.any(1)
    obj_share = (visible & is_object).sum(1)[has_object] / is_object.sum(1)[has_object]
    bg_share = (visible & ~is_object).sum(1) / np.maximum((~is_object).sum(1), 1)
    return {"object_visible": float(obj_share.mean()), "background_visible": float(bg_share.mean()),
            "no_object_visible": float(((visible & is_object).sum(1)[has_object] == 0).mean()),
            "masked_fraction": float(masks.mean()), "position_frequency": masks.mean(0).tolist()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--num-images", type=int, default=2048)
    p.add_argument("--workdir-root", default=os.path.join(REPO, "workdirs", "mim"))
    args = p.parse_args(argv)
    results, missing = {}, []
    for dataset in args.datasets:
        config = CONFIGS[dataset]()
        patch = int(config.model.variant.split("/")[1])
        images, is_object = object_patches(dataset, args.num_images, config.data.image_size, patch)
        grid = config.data.image_size // patch
        for name, strategy in STRATEGIES.items():
            workdir = run_workdir(args.workdir_root, dataset, strategy)
            if strategy in GUIDED and not os.path.exists(os.path.join(workdir, "checkpoints")):
                missing.append(f"{dataset} / {name}: no run in {workdir}")
                continue
            row = summarize(strategy_masks(dataset, strategy, images, workdir), is_object)
            row["grid"] = grid
            results.setdefault(dataset, {})[name] = row
            print(dataset, name, {k: v for k, v in row.items() if k != "position_frequency"}, flush=True)
    command = "python experiments/mim/object_visibility.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write(results, missing, command.strip(), args.num_images)


def write(results: dict, missing: list, command: str, num_images: int) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "object_visibility.json"), "w") as f:
        json.dump({"command": command, "num_images": num_images, "results": results}, f, indent=1)
    lines = ["# What each masking strategy leaves visible (ratio 0.75)", "",
             f"Command: `{command}`. {__doc__.split(chr(10) + chr(10))[2].strip()}", "",
             f"{num_images} eval images per data set. Heat maps: [object_visibility.png](object_visibility.png) "
             "(share of images in which each grid position is masked).", ""]
    for dataset, rows in results.items():
        lines += [f"## {dataset}", "", "| strategy | object patches visible | background patches visible | "
                  "images with no object patch visible | masked at the centre / at the corners |",
                  "|---|---|---|---|---|"]
        for name, r in rows.items():
            freq = np.asarray(r["position_frequency"]).reshape(r["grid"], r["grid"])
            c = r["grid"] // 2
            centre = freq[c - 1:c + 1, c - 1:c + 1].mean()
            corners = np.mean([freq[0, 0], freq[0, -1], freq[-1, 0], freq[-1, -1]])
            lines.append(f"| {name} | {100 * r['object_visible']:.1f} % | {100 * r['background_visible']:.1f} % | "
                         f"{100 * r['no_object_visible']:.1f} % | {100 * centre:.0f} % / {100 * corners:.0f} % |")
        lines.append("")
    if missing:
        lines += ["## Not measured", ""] + [f"- {m}" for m in missing] + [""]
    with open(os.path.join(RESULTS, "object_visibility.md"), "w") as f:
        f.write("\n".join(lines))
    plot(results, os.path.join(RESULTS, "object_visibility.png"))


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(d, n, r) for d, runs in results.items() for n, r in runs.items()]
    if not rows:
        return
    datasets = list(results)
    cols = max(len(results[d]) for d in datasets)
    fig, axes = plt.subplots(len(datasets), cols, figsize=(2.6 * cols, 2.8 * len(datasets)), squeeze=False)
    for i, dataset in enumerate(datasets):
        for j in range(cols):
            ax = axes[i, j]
            ax.axis("off")
            if j >= len(results[dataset]):
                continue
            name, r = list(results[dataset].items())[j]
            freq = np.asarray(r["position_frequency"]).reshape(r["grid"], r["grid"])
            image = ax.imshow(freq, vmin=0, vmax=1, cmap="magma")
            ax.set_title(f"{dataset}\n{name}\nobject visible {100 * r['object_visible']:.0f} %", fontsize=8)
    fig.tight_layout()
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="share of images with the position masked")
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
