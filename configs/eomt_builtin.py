"""EoMT on the built-in panoptic shapes (64x64): a ViT-Ti/8 (6 blocks) whose last 2 blocks also carry 16 learned
queries; masked attention inside the encoder, annealed away (EoMT's per-block poly schedules), so inference runs
the plain ViT. Also the shared settings of configs/{mask2former,perpixel}_builtin.py (same backbone, data, steps,
batch and optimizer), so the three heads compare at equal training budget.

Command:
  python -m maskjax.main --config=configs/eomt_builtin.py --workdir=workdirs/eomt_builtin
Segment images of the trained run into overlay PNGs:
  python -m maskjax.segment --workdir=workdirs/eomt_builtin --out=workdirs/eomt_builtin/segments
Smaller and faster (tests, notebook): --config=configs/eomt_builtin.py:runlocal
Arguments (comma-separated key=value after ':'): runlocal, steps=<int>, size=<image side>.
Runtime and result here (experiments/results/segmentation_builtin.md, seed 0; made by
`python experiments/segmentation/reproduce.py --seeds 0 --studies masked,heads,annealing,points,remax
--report-only` after the runs of
`python experiments/segmentation/reproduce.py --seeds 0`, which evaluate every 250 steps on 500 images):
~27 minutes of training steps on 2 cores for the 2000 steps, PQ 23.2 (things 13.8, stuff 42.1), mIoU 36.0 (the
Mask2Former-style config: PQ 45.5); with --config.model.mask_annealing=always PQ 10.9; with
--config.segmentation.num_points=0 (full-mask loss) PQ 26.1; with ReMaX's relaxations
(--config.segmentation.remask=True --config.segmentation.reclass_eta=0.1) PQ 24.3. Over seeds 0, 1, 2
(experiments/results/segmentation_builtin_seeds.md, its command there; seeds 1-2 trained on one core, ~52 minutes
each): PQ 22.6 ± 5.5 without ReMaX, 23.4 ± 1.5 with it, 26.5 ± 4.1 with the full-mask loss (~36 minutes on one
core). Fine-tuned from an MAE-pretrained backbone
(experiments/results/segmentation_pretrained.md, seed 0, its command there; --config.model.posemb=sincos2d
--config.init_from.workdir=<MAE run> --config.init_from.params_key=encoder): PQ 43.0, mIoU 54.5, ~49 minutes on
one core (the Mask2Former-style config so: PQ 60.1).
"""

import ml_collections

from maskjax.train.config import base_config, parse_config_arg

ARGS = ("runlocal", "steps", "size")


def segmentation_config(head: str, arg: str | None, name: str) -> ml_collections.ConfigDict:
    """The shared built-in segmentation config of `head` ('eomt', 'mask2former' or 'perpixel')."""
    args = parse_config_arg(arg, ARGS, name)
    task = "semantic_segmentation" if head == "perpixel" else "segmentation"
    c = base_config(task, head)
    c.data.name = "builtin_shapes"
    c.data.image_size = int(args.get("size", 64))
    c.model.variant = "Ti/8"
    c.model.depth = 6
    c.model.num_classes = 15  # 5 stuff textures + 10 shapes (BuiltinShapes.panoptic_info()).
    c.model.drop_path_rate = 0.0
    if head != "perpixel":
        c.model.num_queries = 16  # >= 5 stuff + 4 instances, the most an image holds.
    if head == "eomt":
        c.model.num_mask_blocks = 2  # A third of the blocks, as EoMT's 4 of ViT-L's 24 (rounded up).
    c[task].crop_scale = (0.5, 1.0)
    if head != "perpixel":
        c.segmentation.num_stuff_classes = 5
        c.segmentation.max_instances = 4
        c.segmentation.num_points = 1024  # A quarter of the 64x64 pixels (Mask2Former: 12544 = 112^2).
    c.batch_size = 32
    c.total_steps = int(args.get("steps", 2000))
    c.optimizer.learning_rate = 5e-4
    c.optimizer.warmup_steps = 100
    c.evals.eval.every = 500
    c.evals.eval.examples = 1000
    c.checkpoint_every = 500
    if args.get("runlocal"):
        c.data.image_size = int(args.get("size", 32))
        c.model.variant = "mu/8"
        c.model.depth = -1
        if head == "eomt":
            c.model.num_mask_blocks = 1
        if head == "mask2former":
            c.model.decoder_dim = 32
            c.model.decoder_heads = 2
            c.model.decoder_mlp_dim = 64
            c.model.decoder_layers = 3
        if head != "perpixel":
            c.segmentation.num_points = 128
        c.batch_size = 8
        c.total_steps = int(args.get("steps", 20))
        c.optimizer.warmup_steps = 2
        c.evals.eval.every = 10
        c.evals.eval.examples = 64
        c.evals.predictions.count = 4
        c.checkpoint_every = 10
        c.log_every = 5
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return segmentation_config("eomt", arg, "configs/eomt_builtin.py")
