"""VideoMAE-style pre-training on procedural clips ('builtin_clips': built-in shapes seen by a panning camera,
8 frames of 32x32): tubelets of 2 frames x 4 x 4 pixels, tube masking at 90% (VideoMAE's ratio), norm-pix
loss; then a linear probe and k-NN of the encoder (clip labels = the shape class) against its initialisation.

Command:
  python -m maskjax.main --config=configs/videomae_builtin.py --workdir=workdirs/videomae_builtin
Smaller and faster (tests): --config=configs/videomae_builtin.py:runlocal
Arguments (comma-separated key=value after ':'): runlocal, steps=<int>, frames=<int>, ratio=<float>,
masking=tube|random.
"""

import ml_collections

from maskjax.train.config import base_config, eval_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("runlocal", "steps", "frames", "ratio", "masking"), "configs/videomae_builtin.py")
    c = base_config("mim")
    c.data.name = "builtin_clips"
    c.data.num_frames = int(args.get("frames", 8))
    c.data.image_size = 32
    c.data.augment = True  # the same crop and flip for every frame of a clip
    c.model.variant = "Ti/4"
    c.model.tubelet_size = 2
    c.model.depth = 6
    c.model.posemb = "sincos2d"  # fixed space-time sin-cos for video
    c.model.drop_path_rate = 0.0
    c.mim.masking = args.get("masking", "tube")
    c.mim.mask_ratio = float(args.get("ratio", 0.9))
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads, c.model.decoder_mlp_dim = 128, 2, 4, 512
    c.batch_size = 64
    c.total_steps = int(args.get("steps", 2000))
    c.optimizer.learning_rate = 1.5e-3  # as configs/mae_builtin.py
    c.optimizer.b2 = 0.95
    c.optimizer.warmup_steps = 40
    c.evals.eval.every = 500
    c.evals.eval.examples = 2000
    c.checkpoint_every = 500
    c.evals.reconstructions.count = 4
    c.evals.probe = eval_config({"type": "probe", "train_examples": 5000, "eval_examples": 2000})
    if args.get("runlocal"):
        c.data.num_frames = int(args.get("frames", 4))
        c.model.variant, c.model.depth = "mu/8", -1
        c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads, c.model.decoder_mlp_dim = 32, 1, 2, 64
        c.batch_size, c.total_steps, c.optimizer.warmup_steps = 16, int(args.get("steps", 20)), 2
        c.evals.eval.every, c.evals.eval.examples, c.checkpoint_every, c.log_every = 10, 64, 10, 5
        c.evals.probe.train_examples, c.evals.probe.eval_examples = 200, 200
    return c
