"""The autoregressive baseline of MaskGIT on the built-in shapes: the same transformer as configs/maskgit_builtin.py,
causal in raster order over the 8x8 token grids of the same frozen tokenizer, sampled token by token with a
key/value cache.

Command (after the tokenizer of configs/maskgit_builtin.py):
  python -m maskjax.main --config=configs/autoregressive_builtin.py --workdir=workdirs/autoregressive_builtin \
      --config.autoregressive.tokenizer_workdir=workdirs/tokenizer_builtin
Smaller and faster (tests): --config=configs/autoregressive_builtin.py:runlocal (with a runlocal tokenizer).
Arguments (comma-separated key=value after ':'): runlocal, steps=<int>, tokenizer=<workdir>.
"""

import ml_collections

from maskjax.train.config import base_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("runlocal", "steps", "tokenizer"), "configs/autoregressive_builtin.py")
    c = base_config("autoregressive")
    c.data.name = "builtin_shapes"
    c.data.image_size = 32
    c.data.augment = False
    c.autoregressive.tokenizer_workdir = args.get("tokenizer", "workdirs/tokenizer_builtin")
    c.model.num_classes = 10
    # Width 128 (MaskGIT: 768): a step of batch 64 over 65 tokens then takes a fraction of a second here.
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 128, 4, 4, 512
    c.batch_size = 64
    c.total_steps = int(args.get("steps", 2000))
    c.optimizer.learning_rate = 1e-3
    c.optimizer.b2 = 0.96
    c.optimizer.weight_decay = 0.045
    c.optimizer.warmup_steps = 100
    c.evals.eval.every = 500
    c.evals.eval.examples = 1000
    c.checkpoint_every = 500
    if args.get("runlocal"):
        c.autoregressive.tokenizer_workdir = args.get("tokenizer", "workdirs/tokenizer_runlocal")
        c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 1, 2, 64
        c.total_steps = int(args.get("steps", 20))
        c.batch_size = 16
        c.optimizer.warmup_steps = 5
        c.evals.eval.every = 10
        c.evals.eval.examples = 256
        c.evals.samples.count = 4
        c.checkpoint_every = 10
        c.log_every = 5
    return c
