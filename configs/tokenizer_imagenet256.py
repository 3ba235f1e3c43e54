"""A VQ tokenizer with the layout of MaskGIT's VQGAN on ImageNet 256x256 through TFDS (`imagenet2012`, prepared in the
TFDS data dir): f = 16 (channel multipliers 1, 1, 2, 2, 4; 128 filters; 2 residual blocks per level), 1024 codes of
dimension 256, codebook + 0.25 commitment loss (no EMA), as in google-research/maskgit `configs/vqgan_config.py`.
Not run here (no ImageNet, no accelerator). The optimizer settings (Adam 0/0.99, lr 1e-4, 10k warm-up steps,
500k steps) are maskjax's choice: the official VQGAN training recipe is not in the stored sources.

The blocks are the official ones (`model.layout='maskgit'`: bias-free convolutions, average-pool downsampling), so
the official weights import into this model (maskjax/convert/maskgit_official.py). Differences from the official
training: no perceptual (VGG) and no adversarial loss by default (VGG weights are not available offline), so a
tokenizer trained with this config will be blurrier than the official one (reported rFID 2.28); the imported
official weights are the intended tokenizer of configs/maskgit_imagenet256.py.

Command (a TPU/GPU pod; every process runs it, see README "Devices, meshes and many hosts"):
  python -m maskjax.main --config=configs/tokenizer_imagenet256.py --workdir=gs://bucket/tokenizer256 --distributed=auto
Arguments: steps=<int>, runlocal (the same keys on the built-in data with a tiny model: checks the config here).
"""

import ml_collections

from maskjax.train.config import base_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("steps", "runlocal"), "configs/tokenizer_imagenet256.py")
    c = base_config("tokenizer")
    c.data.name = "tfds:imagenet2012"
    c.data.image_size = 256
    c.data.augment = True
    c.model.quantizer = "vq"
    c.model.codebook_size = 1024
    c.model.embedding_dim = 256
    c.model.commitment_cost = 0.25
    c.model.filters = 128
    c.model.channel_multipliers = (1, 1, 2, 2, 4)
    c.model.num_res_blocks = 2
    c.model.norm_groups = 32
    c.model.channels = 3
    c.model.layout = "maskgit"
    c.batch_size = 256
    c.total_steps = int(args.get("steps", 500_000))
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.b1, c.optimizer.b2 = 0.0, 0.99
    c.optimizer.weight_decay = 0.0
    c.optimizer.warmup_steps = 10_000
    c.evals.eval.every = 10_000
    c.evals.eval.examples = 10_000
    c.checkpoint_every = 5_000
    c.data.num_threads = 16
    c.data.prefetch = 4
    if args.get("runlocal"):
        c.data.name, c.data.image_size, c.data.num_threads, c.data.prefetch = "builtin_shapes", 32, 0, 2
        c.model.codebook_size, c.model.embedding_dim, c.model.filters, c.model.norm_groups = 64, 8, 8, 4
        c.model.channel_multipliers, c.model.num_res_blocks = (1, 2), 1
        c.batch_size, c.total_steps, c.optimizer.warmup_steps = 16, 10, 2
        c.evals.eval.every, c.evals.eval.examples, c.evals.eval.batch_size = 5, 64, 32
        c.checkpoint_every, c.log_every = 5, 5
    return c
