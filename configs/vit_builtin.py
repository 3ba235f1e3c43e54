"""Supervised ViT on the built-in procedural shapes data set (the main job of the first release; now `make run`
runs configs/mae_builtin.py).

Command:
  python -m maskjax.main --config=configs/vit_builtin.py --workdir=workdirs/vit_builtin
Smaller and faster (tests, notebooks): --config=configs/vit_builtin.py:runlocal
Arguments (comma-separated key=value after ':'): runlocal, variant=<size/patch>, steps=<int>.
Expected result (measured on this CPU, seed 0): see README.md, "Main job".
"""

import ml_collections

from maskjax.train.config import base_config, eval_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("runlocal", "variant", "steps"), "configs/vit_builtin.py")
    c = base_config()
    c.data.name = "builtin_shapes"
    c.data.image_size = 32
    c.model.variant = args.get("variant", "Ti/4")
    c.model.depth = 6  # Half-depth ViT-Ti: learns the shapes in minutes on a CPU.
    c.model.num_classes = 10
    c.batch_size = 64
    c.total_steps = int(args.get("steps", 300))
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 30
    c.evals.eval.every = 100
    # Off by default; `--config.evals.probe.every=0` probes the features at the end (experiments/mim).
    c.evals.probe = eval_config({"type": "probe", "every": -1, "train_examples": 10000})
    c.checkpoint_every = 100
    if args.get("runlocal"):
        c.model.variant = args.get("variant", "mu/4")
        c.model.depth = -1
        c.total_steps = int(args.get("steps", 40))
        c.batch_size = 32
        c.optimizer.warmup_steps = 5
        c.evals.eval.every = 20
        c.evals.eval.examples = 500
        c.checkpoint_every = 20
        c.log_every = 5
    return c
