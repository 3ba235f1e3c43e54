"""Segment images with a trained segmentation run into overlay PNGs (and an .npz of the predictions):

    python -m maskjax.segment --workdir=workdirs/eomt_builtin --num=8
    python -m maskjax.segment --workdir=workdirs/eomt_builtin --images=a.png,b.jpg --out=/tmp/segs

The run's config.json gives the task ('segmentation' or 'semantic_segmentation') and its data; its latest (or
`--step`) checkpoint gives the weights. Without `--images` it segments the first `--num` examples of the run's
evaluation split (with their ground truth); image files are resized to the run's image size (no ground truth).
Writes `<out>/overlay.png` (one row per image: image | ground truth | prediction | largest per-query masks) and
`<out>/predictions.npz` ('semantic' int32 [N, H, W]; mask models add 'panoptic_ids' [N, H, W], 'panoptic_classes'
[N, Q]). `--out` defaults to `<workdir>/segments/step<step>`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a trained segmentation / semantic_segmentation run.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1 = latest).")
_NUM = flags.DEFINE_integer("num", 8, "Examples of the evaluation split to segment (without --images).")
_IMAGES = flags.DEFINE_list("images", [], "Image files to segment instead of the evaluation split.")
_OUT = flags.DEFINE_string("out", "", "Output directory ('' = <workdir>/segments/step<S>).")

TASKS = ("segmentation", "semantic_segmentation")


def _read_images(paths: list[str], size: int, channels: int):
    import numpy as np
    from PIL import Image

    images = []
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"--images: no file {path!r}")
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(image, np.float32).reshape(size, size, channels)
        images.append(array / 127.5 - 1.0)
    return np.stack(images)


def main(argv: list[str]) -> None:
    del argv
    if not _WORKDIR.value:
        sys.exit("Error: --workdir is required")
    if _NUM.value < 1:
        sys.exit(f"Error: --num={_NUM.value} must be >= 1")

    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO

    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from maskjax.data import pipeline
    from maskjax.train.checkpoint import load_run

    try:
        config, task, params, step = load_run(_WORKDIR.value, _STEP.value, TASKS, "segment")
        data = config.data
        source = pipeline.make_source(data.name, data.eval_split, seed=data.seed, image_size=data.image_size,
                                      data_dir=data.data_dir or None)
        batch = pipeline.EvalLoader(source, global_batch_size=min(_NUM.value, len(source)),
                                    image_size=data.image_size, num_examples=min(_NUM.value, len(source)),
                                    keys=task.batch_fields, num_threads=0).batch_at(0)
        if _IMAGES.value:
            images = _read_images(_IMAGES.value, data.image_size, batch["image"].shape[-1])
            # No ground truth for files: void maps (drawn black).
            batch = {"image": images, **{k: np.full(images.shape[:3], -1 if k == "semantic" else 0, np.int32)
                                         for k in task.batch_fields[1:]}}
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"Error: {error}")

    params = jax.tree.map(jnp.asarray, params)
    predictions = jax.device_get(jax.jit(task.predict)(params, {"image": jnp.asarray(batch["image"])}))
    picture = task.visualize(batch, predictions)
    out = _OUT.value or os.path.join(_WORKDIR.value, "segments", f"step{step}")
    os.makedirs(out, exist_ok=True)
    Image.fromarray(picture).save(os.path.join(out, "overlay.png"))
    np.savez(os.path.join(out, "predictions.npz"),
             **{k: np.asarray(v) for k, v in predictions.items() if k != "mask_probs"})
    print(f"Wrote {len(batch['image'])} segmented images of step {step}: {out}/overlay.png, {out}/predictions.npz")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
