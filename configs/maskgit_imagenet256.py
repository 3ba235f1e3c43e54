"""MaskGIT on ImageNet 256x256 through TFDS (`imagenet2012`): the paper's recipe (Chang et al. 2022, and
google-research/maskgit's `configs/maskgit_class_cond_config.py`): a BERT-sized bidirectional transformer (24 blocks,
width 768, 16 heads, MLP 3072, dropout 0.1) over the 16x16 tokens of a frozen f = 16, 1024-code tokenizer
(configs/tokenizer_imagenet256.py), cosine schedule, label smoothing 0.1, Adam (0.9, 0.96), lr 1e-4, weight decay
0.045, batch 256; 8 decoding steps with choice temperature 4.5. Not run here (no ImageNet, no accelerator).

The transformer has the official architecture (post-LN BERT blocks, tanh GELU, LayerNorm eps 1e-12), so the
official checkpoints import into it (maskjax/convert/maskgit_official.py; `python -m maskjax.convert.maskgit_official`
writes them as a tokenizer run and a MaskGIT run). Differences from the official training: label dropout 0.1 trains
a null class for classifier-free guidance (the official code has none; guidance stays off by default,
maskgit.guidance_scale = 0); the official `min_masking_rate=0.5` is not implemented. The training length of the paper
(300 epochs) is recalled, not found in the stored sources: unverified; the 5k warm-up steps are maskjax's choice.

Commands (a TPU/GPU pod; every process runs them):
  python -m maskjax.main --config=configs/tokenizer_imagenet256.py --workdir=gs://bucket/tokenizer256 --distributed=auto
  python -m maskjax.main --config=configs/maskgit_imagenet256.py --workdir=gs://bucket/maskgit256 --distributed=auto \
      --config.maskgit.tokenizer_workdir=gs://bucket/tokenizer256
Arguments: epochs=<int> (default 300), tokenizer=<workdir>, runlocal (the same keys on the built-in data with a
tiny model and a runlocal tokenizer: checks the config here).
"""

import ml_collections

from maskjax.train.config import base_config, parse_config_arg

TRAIN_IMAGES = 1_281_167


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("epochs", "tokenizer", "runlocal"), "configs/maskgit_imagenet256.py")
    batch = 256
    steps_per_epoch = TRAIN_IMAGES // batch
    c = base_config("maskgit")
    c.data.name = "tfds:imagenet2012"
    c.data.image_size = 256
    c.data.augment = True
    c.maskgit.tokenizer_workdir = args.get("tokenizer", "workdirs/tokenizer_imagenet256")
    c.maskgit.schedule = "cosine"
    c.maskgit.label_smoothing = 0.1
    c.maskgit.label_drop = 0.1
    c.maskgit.decode_steps = 8
    c.maskgit.choice_temperature = 4.5
    c.model.num_classes = 1000
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 768, 24, 16, 3072
    c.model.dropout = 0.1
    c.model.norm_position, c.model.approximate_gelu, c.model.layer_norm_eps = "post", True, 1e-12
    c.model.dtype = "bfloat16"
    c.batch_size = batch
    c.total_steps = int(args.get("epochs", 300)) * steps_per_epoch
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.96
    c.optimizer.weight_decay = 0.045
    c.optimizer.warmup_steps = 5_000
    c.evals.eval.every = 10_000
    c.evals.eval.examples = 10_000
    c.evals.samples.count = 16
    c.checkpoint_every = 5_000
    c.data.num_threads = 16
    c.data.prefetch = 4
    if args.get("runlocal"):
        c.data.name, c.data.image_size, c.data.num_threads, c.data.prefetch = "builtin_shapes", 32, 0, 2
        c.maskgit.tokenizer_workdir = args.get("tokenizer", "workdirs/tokenizer_runlocal")
        c.model.num_classes, c.model.dtype = 10, "float32"
        c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 1, 2, 64
        c.maskgit.decode_steps = 4
        c.batch_size, c.total_steps, c.optimizer.warmup_steps = 16, 10, 2
        c.evals.eval.every, c.evals.eval.examples, c.evals.eval.batch_size = 5, 64, 32
        c.evals.samples.count = 4
        c.checkpoint_every, c.log_every = 5, 5
    return c
