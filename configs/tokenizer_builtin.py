"""An FSQ image tokenizer on the built-in procedural shapes: 32x32 images -> 8x8 = 64 tokens of 1000 codes (levels
8, 5, 5, 5), a small VQGAN-style convolutional autoencoder (f = 4), mean-squared-error loss only. The MaskGIT
generator (configs/maskgit_builtin.py) reads its parameters.

Runtime here: about 16 minutes for 2000 steps on the 2-core CPU (experiments/results/maskgit_builtin_cost.md).
Result (experiments/results/maskgit_builtin.md, `python experiments/maskgit/reproduce.py`): on the validation split
98.5 % of the 1000 codes used, perplexity 589, PSNR 20.4 dB; the same with `quantizer=vq` uses 8.7 % (19.1 dB).

Command:
  python -m maskjax.main --config=configs/tokenizer_builtin.py --workdir=workdirs/tokenizer_builtin
Smaller and faster (tests, notebooks): --config=configs/tokenizer_builtin.py:runlocal
Arguments (comma-separated key=value after ':'): runlocal, quantizer=fsq|vq, steps=<int>.
"""

import ml_collections

from maskjax.train.config import base_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("runlocal", "quantizer", "steps"), "configs/tokenizer_builtin.py")
    c = base_config("tokenizer")
    c.data.name = "builtin_shapes"
    c.data.image_size = 32
    c.data.augment = False  # The generator sees the tokens of un-augmented images.
    c.model.quantizer = args.get("quantizer", "fsq")
    c.model.fsq_levels = (8, 5, 5, 5)
    c.model.codebook_size = 1000  # VQ: as many codes as FSQ's.
    c.model.channels = 3
    # 32 filters: the 64 of VQGAN-style tokenizers cost ~4x the FLOPs (~2-4 s per step of batch 64 here).
    c.model.filters, c.model.embedding_dim, c.model.norm_groups = 32, 32, 8
    c.batch_size = 32
    c.total_steps = int(args.get("steps", 2000))
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_steps = 100
    c.evals.eval.every = 500
    c.evals.eval.examples = 1000
    c.checkpoint_every = 500
    if args.get("runlocal"):
        c.model.filters, c.model.embedding_dim, c.model.norm_groups = 16, 16, 8
        c.batch_size = 16
        c.total_steps = int(args.get("steps", 30))
        c.optimizer.warmup_steps = 5
        c.evals.eval.every = 15
        c.evals.eval.examples = 256
        c.evals.reconstructions.count = 4
        c.checkpoint_every = 15
        c.log_every = 5
    return c
