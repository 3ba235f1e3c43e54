"""MAE ViT-B/16 pre-training on ImageNet-1k through TFDS (`imagenet2012`; the data must be prepared in the TFDS
data dir: ImageNet needs a manual download). The recipe of He et al. 2022 (Table 8): mask ratio 0.75, norm-pix
loss, 1600 epochs, batch 4096, AdamW (b2 0.95, weight decay 0.05), lr 1.5e-4 x batch / 256, 40 warm-up epochs,
cosine decay, decoder 512 wide and 8 deep, fixed sin-cos position embeddings.

Command (a TPU/GPU pod; every process runs the same command, see README "Devices, meshes and many hosts"):
  python -m maskjax.main --config=configs/mae_imagenet.py --workdir=gs://bucket/mae_b16 --distributed=auto
Arguments: epochs=<int> (default 1600), batch=<int> (default 4096), runlocal (the same keys on the built-in data
with a tiny model: checks the config on a laptop, where ImageNet is not available).
Differences from the paper: augmentation is maskjax's random crop (pad 4) + flip, not RandomResizedCrop(0.2, 1).
"""

import ml_collections

from maskjax.train.config import base_config, parse_config_arg

TRAIN_IMAGES = 1_281_167


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("epochs", "batch", "runlocal"), "configs/mae_imagenet.py")
    epochs, batch = int(args.get("epochs", 1600)), int(args.get("batch", 4096))
    steps_per_epoch = TRAIN_IMAGES // batch
    c = base_config("mim")
    c.data.name = "tfds:imagenet2012"
    c.data.image_size = 224
    c.data.eval_split = "validation"
    c.model.variant = "B/16"
    c.model.posemb = "sincos2d"
    c.model.drop_path_rate = 0.0
    c.model.dtype = "bfloat16"
    c.model.mode = "mae"
    c.mim.mask_ratio = 0.75
    c.mim.target = "norm_pixels"
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads, c.model.decoder_mlp_dim = 512, 8, 16, 2048
    c.batch_size = batch
    c.total_steps = epochs * steps_per_epoch
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1.5e-4 * batch / 256
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
    c.optimizer.weight_decay = 0.05
    c.optimizer.warmup_steps = 40 * steps_per_epoch
    c.optimizer.grad_clip_norm = 0.0  # MAE pre-training does not clip
    c.evals.eval.every = 20 * steps_per_epoch
    c.evals.eval.examples = 10000
    c.evals.eval.batch_size = 1024
    c.checkpoint_every = 2 * steps_per_epoch
    c.evals.reconstructions.count = 16
    c.data.num_threads = 16
    c.data.prefetch = 4
    if args.get("runlocal"):
        c.data.name, c.data.image_size, c.data.num_threads, c.data.prefetch = "builtin_shapes", 32, 0, 2
        c.model.variant, c.model.dtype = "mu/4", "float32"
        c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads, c.model.decoder_mlp_dim = 32, 1, 2, 64
        c.batch_size, c.total_steps, c.optimizer.warmup_steps = 32, 10, 2
        c.evals.eval.every, c.evals.eval.examples, c.evals.eval.batch_size = 5, 64, 32
        c.checkpoint_every, c.log_every = 5, 5
    # No probe evaluator: ImageNet linear probing is its own 90-epoch recipe; k-NN here would be slow.
    return c
