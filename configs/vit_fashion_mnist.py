"""Supervised ViT on Fashion-MNIST (28x28 grey, 10 classes) from local IDX files or TFDS.

Needs the data: `apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist/), or
TensorFlow + internet for TFDS `fashion_mnist`.
Command:
  python -m maskjax.main --config=configs/vit_fashion_mnist.py --workdir=workdirs/vit_fmnist
Arguments after ':' (comma-separated): runlocal, variant=<size/patch>, steps=<int>.
"""

import ml_collections

from maskjax.train.config import base_config, eval_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("runlocal", "variant", "steps"), "configs/vit_fashion_mnist.py")
    c = base_config()
    c.data.name = "fashion_mnist"
    c.data.image_size = 28
    c.data.eval_split = "test"
    c.data.augment = False  # Fashion-MNIST items are centred; flips and crops help little in short runs.
    c.model.variant = args.get("variant", "Ti/4")
    c.model.depth = 6
    c.model.num_classes = 10
    c.batch_size = 128
    c.total_steps = int(args.get("steps", 1000))
    c.optimizer.warmup_steps = 50
    c.evals.eval.every = 250
    # Off by default; `--config.evals.probe.every=0` probes the features at the end (experiments/mim).
    c.evals.probe = eval_config({"type": "probe", "every": -1, "train_examples": 10000})
    c.checkpoint_every = 250
    if args.get("runlocal"):
        c.model.variant = args.get("variant", "mu/4")
        c.model.depth = -1
        c.batch_size = 32
        c.total_steps = int(args.get("steps", 30))
        c.optimizer.warmup_steps = 5
        c.evals.eval.every = 0
        c.evals.eval.examples = 500
        c.log_every = 5
    return c
