"""M2T on the built-in shapes: the transformer of configs/maskgit_builtin.py over the same frozen tokenizer's 8x8
grids, decoded in a fixed Halton order in 8 groups sized by the cosine schedule; trained with masked inputs and
the group attention mask, so decoding caches the keys and values of decoded groups.

Command (after the tokenizer of configs/maskgit_builtin.py):
  python -m maskjax.main --config=configs/m2t_builtin.py --workdir=workdirs/m2t_builtin \
      --config.m2t.tokenizer_workdir=workdirs/tokenizer_builtin
Smaller and faster (tests): --config=configs/m2t_builtin.py:runlocal (with a runlocal tokenizer).
Arguments (comma-separated key=value after ':'): runlocal, steps=<int>, tokenizer=<workdir>.
"""

import ml_collections

from maskjax.train.config import base_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("runlocal", "steps", "tokenizer"), "configs/m2t_builtin.py")
    c = base_config("m2t")
    c.data.name = "builtin_shapes"
    c.data.image_size = 32
    c.data.augment = False
    c.m2t.tokenizer_workdir = args.get("tokenizer", "workdirs/tokenizer_builtin")
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
        c.m2t.tokenizer_workdir = args.get("tokenizer", "workdirs/tokenizer_runlocal")
        c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 1, 2, 64
        c.m2t.decode_steps = 4
        c.total_steps = int(args.get("steps", 20))
        c.batch_size = 16
        c.optimizer.warmup_steps = 5
        c.evals.eval.every = 10
        c.evals.eval.examples = 256
        c.evals.samples.count = 4
        c.checkpoint_every = 10
        c.log_every = 5
    return c
