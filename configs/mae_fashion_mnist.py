"""MAE pre-training on Fashion-MNIST (28x28 grey; Debian `dataset-fashion-mnist` files or TFDS), then linear
probe + k-NN against the same encoder at initialisation.

Command:
  python -m maskjax.main --config=configs/mae_fashion_mnist.py --workdir=workdirs/mae_fmnist
Fine-tune the encoder afterwards (classification, all layers):
  python -m maskjax.main --config=configs/vit_fashion_mnist.py --workdir=workdirs/mae_fmnist_ft \\
      --config.init_from.workdir=workdirs/mae_fmnist --config.init_from.params_key=encoder \\
      --config.model.posemb=sincos2d --config.model.depth=6
Arguments (comma-separated key=value after ':'): runlocal, steps=<int>, masking=<name>, ratio=<float>.
"""

import ml_collections

from maskjax.train.config import base_config, eval_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("runlocal", "steps", "masking", "ratio"), "configs/mae_fashion_mnist.py")
    c = base_config("mim")
    c.data.name = "fashion_mnist"
    c.data.image_size = 28
    c.data.eval_split = "test"
    c.data.augment = False
    c.model.variant = "Ti/4"  # 7 x 7 patches
    c.model.depth = 6
    c.model.posemb = "sincos2d"
    c.model.drop_path_rate = 0.0
    c.mim.masking = args.get("masking", "random")
    c.mim.mask_ratio = float(args.get("ratio", 0.75))
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads, c.model.decoder_mlp_dim = 128, 2, 4, 512
    c.batch_size = 128
    c.total_steps = int(args.get("steps", 2000))
    c.optimizer.learning_rate = 1.5e-3  # as configs/mae_builtin.py (3e-4 was measured worse there)
    c.optimizer.b2 = 0.95
    c.optimizer.warmup_steps = 100
    c.evals.eval.every = 500
    c.checkpoint_every = 500
    c.evals.reconstructions.count = 8
    c.evals.probe = eval_config({"type": "probe", "train_examples": 10000})
    if args.get("runlocal"):
        c.model.variant, c.model.depth = "mu/4", -1
        c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads, c.model.decoder_mlp_dim = 32, 1, 2, 64
        c.batch_size, c.total_steps, c.optimizer.warmup_steps = 32, int(args.get("steps", 30)), 5
        c.evals.eval.every, c.evals.eval.examples, c.checkpoint_every, c.log_every = 0, 500, 30, 5
        c.evals.probe.train_examples, c.evals.probe.eval_examples = 500, 500
    return c
