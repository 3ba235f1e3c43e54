"""Does tokenizing on the fly cost much? A MaskGIT train step (loss + gradients, jitted) that runs the frozen
tokenizer's encoder on the batch's images, side by side with the same step fed precomputed token ids.

    python experiments/maskgit/bench_tokenize.py

The models are those of configs/tokenizer_builtin.py and configs/maskgit_builtin.py at batch 64 (random weights:
a 1-step tokenizer run is made in a temporary directory). Both variants are compiled first; then they alternate,
`--rounds` rounds of `--steps` steps each, and the median per-step time of each is reported with their ratio.
Writes experiments/results/maskgit_tokenize.{md,json}.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(ROOT, "experiments", "results")
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    import flax.linen as nn

    from configs import maskgit_builtin, tokenizer_builtin
    from maskjax.tasks.maskgit import MaskGITTask
    from maskjax.train.checkpoint import load_params
    from maskjax.train.trainer import Trainer

    tokenizer_dir = tempfile.mkdtemp(prefix="bench_tokenize_")
    tc = tokenizer_builtin.get_config()
    tc.total_steps, tc.optimizer.warmup_steps, tc.checkpoint_every, tc.progress_bar = 1, 0, 1, False
    tc.evals.eval.every, tc.evals.reconstructions.every, tc.async_checkpointing = -1, -1, False
    Trainer(tc, tokenizer_dir).run()
    config = maskgit_builtin.get_config(f"tokenizer={tokenizer_dir}")
    task = MaskGITTask(config, load_params=load_params)
    batch_size = config.batch_size
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (batch_size, 32, 32, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
    params = nn.meta.unbox(task.init(jax.random.key(0), batch))["params"]
    ids = task.tokenize(batch["image"])

    def on_the_fly(params, batch, key):
        return jax.grad(lambda p: task.loss(p, batch, key)[0])(params)

    def precomputed(params, batch, key):
        tokenize = task.tokenize
        task.tokenize = lambda images: batch["ids"]  # at trace time: the step reads the ids from the batch
        try:
            return jax.grad(lambda p: task.loss(p, batch, key)[0])(params)
        finally:
            task.tokenize = tokenize

    variants = {"on the fly (encoder in the step)": (jax.jit(on_the_fly), batch),
                "precomputed ids": (jax.jit(precomputed), {**batch, "ids": ids})}
    for fn, b in variants.values():
        jax.block_until_ready(fn(params, b, jax.random.key(0)))
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            fn, b = variants[name]
            start = time.perf_counter()
            for s in range(args.steps):
                out = fn(params, b, jax.random.key(s))
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["on the fly (encoder in the step)"] / median["precomputed ids"]
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    command = "python experiments/maskgit/bench_tokenize.py" + (
        f" --rounds {args.rounds}" if args.rounds != 5 else "") + (f" --steps {args.steps}" if args.steps != 5 else "")
    m = config.model
    lines = ["# On-the-fly tokenization in the MaskGIT train step", "", f"`{command}`", "",
             f"Date: {datetime.date.today()}. maskjax commit `{commit}`. Batch {batch_size} of 32x32 images; "
             f"tokenizer of configs/tokenizer_builtin.py (filters {tc.model.filters}, multipliers "
             f"{tuple(tc.model.channel_multipliers)}); transformer of configs/maskgit_builtin.py (width {m.width}, "
             f"depth {m.depth}). Median seconds per step over {args.rounds} alternating rounds of {args.steps} steps.",
             "", "| variant | s / step |", "|---|---|",
             *[f"| {name} | {sec:.4f} |" for name, sec in median.items()], "",
             f"On-the-fly / precomputed: **{ratio:.2f}x**."]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "maskgit_tokenize.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, "maskgit_tokenize.json"), "w") as f:
        json.dump({"command": command, "commit": commit, "seconds_per_step": median, "ratio": ratio,
                   "rounds": times}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
