"""Sample from a trained generator run into a PNG grid and an .npz:

    python -m maskjax.sample --workdir=workdirs/maskgit_builtin --num=64 --class=3 --steps=8
    python -m maskjax.sample --workdir=workdirs/maskgit_builtin --num=40 --class=-1 --guidance=2.0   # all classes

The run's config.json gives the task ('maskgit', 'm2t' or 'autoregressive') and its tokenizer; its latest (or
`--step`) checkpoint gives the weights. Writes `<out>.png` (a grid, one row per 8 samples) and `<out>.npz`
(`images` float32 [num, H, W, C] in [-1, 1], `tokens` int32 [num, N], `labels` int32 [num]); `--out` defaults to
`<workdir>/samples/step<step>_class<c>`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a trained maskgit / m2t / autoregressive run.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1 = latest).")
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.")
_CLASS = flags.DEFINE_integer("class", -1, "Class of every sample; -1 = cycle through the classes; -2 = the null "
                              "class (unconditional).")
_STEPS = flags.DEFINE_integer("steps", 0, "MaskGIT decoding steps (0 = the run's config.maskgit.decode_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", -1.0, "MaskGIT classifier-free guidance w (-1 = the run's setting).")
_TEMPERATURE = flags.DEFINE_float("choice_temperature", -1.0, "MaskGIT confidence temperature (-1 = the run's).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Samples decoded at once.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling.")
_OUT = flags.DEFINE_string("out", "", "Output path without extension ('' = <workdir>/samples/step<S>_class<C>).")

GENERATORS = ("maskgit", "m2t", "autoregressive")


def _labels(num: int, cls: int, num_classes: int, null_class: int):
    import numpy as np
    if cls == -2 or num_classes == 0:
        return np.full(num, null_class, np.int32)
    if cls == -1:
        return (np.arange(num) % num_classes).astype(np.int32)
    if not 0 <= cls < num_classes:
        raise ValueError(f"--class={cls}: must be in [0, {num_classes}), -1 (all classes) or -2 (null class)")
    return np.full(num, cls, np.int32)


def main(argv: list[str]) -> None:
    del argv
    if not _WORKDIR.value:
        sys.exit("Error: --workdir is required")
    if _NUM.value < 1 or _BATCH.value < 1:
        sys.exit(f"Error: --num={_NUM.value} and --batch_size={_BATCH.value} must be >= 1")

    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO

    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from maskjax.tasks.tokenizer import image_grid
    from maskjax.train.checkpoint import load_run

    try:
        config, task, params, step = load_run(_WORKDIR.value, _STEP.value, GENERATORS, "sample")
        labels = _labels(_NUM.value, _CLASS.value, config.model.num_classes, task.model.null_class)
        sampling = {}
        if _STEPS.value and not 1 <= _STEPS.value <= task.num_tokens:
            raise ValueError(f"--steps={_STEPS.value}: must be in [1, {task.num_tokens}] (the number of tokens)")
        if config.task == "maskgit":
            for flag, key, unset in ((_STEPS, "num_steps", 0), (_GUIDANCE, "guidance_scale", -1.0),
                                     (_TEMPERATURE, "choice_temperature", -1.0)):
                if flag.value != unset:
                    sampling[key] = flag.value
        else:
            for flag, unset in ((_STEPS, 0), (_GUIDANCE, -1.0), (_TEMPERATURE, -1.0)):
                if flag.value != unset:
                    raise ValueError(f"--{flag.name}={flag.value}: a {config.task!r} run has no such setting")
        # Check the decoding settings (steps, guidance) once, on one example, before the whole batch.
        if config.task == "maskgit":
            jax.eval_shape(lambda p, l, k: task.sample(p, l, k, **sampling), params, labels[:1], jax.random.key(0))
    except ValueError as error:
        sys.exit(f"Error: {error}")

    def tokens_and_images(p, batch_labels, key):
        out = task.sample(p, batch_labels, key, **sampling)
        tokens = out[0] if isinstance(out, tuple) else out
        return tokens, task.detokenize(tokens)

    generate = jax.jit(tokens_and_images)
    params = jax.tree.map(jnp.asarray, params)
    tokens, images = [], []
    for start in range(0, _NUM.value, _BATCH.value):
        chunk = labels[start:start + _BATCH.value]
        t, x = generate(params, jnp.asarray(chunk), jax.random.fold_in(jax.random.key(_SEED.value), start))
        tokens.append(np.asarray(t))
        images.append(np.asarray(x, np.float32))
    tokens, images = np.concatenate(tokens), np.concatenate(images)
    name = "all" if _CLASS.value == -1 else "null" if _CLASS.value == -2 else str(_CLASS.value)
    out = _OUT.value or os.path.join(_WORKDIR.value, "samples", f"step{step}_class{name}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    per_row = 8
    rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
    if len(rows[-1]) < per_row:
        rows[-1] = np.concatenate([rows[-1], np.full((per_row - len(rows[-1]),) + images.shape[1:], -1.0)])
    Image.fromarray(image_grid(rows, upscale=2)).save(out + ".png")
    np.savez(out + ".npz", images=images, tokens=tokens, labels=labels)
    print(f"Wrote {len(images)} samples of step {step}: {out}.png, {out}.npz")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
