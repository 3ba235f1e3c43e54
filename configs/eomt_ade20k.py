"""EoMT-L for ADE20K semantic segmentation at 512x512 (150 classes, mask classification with every class as stuff,
Mask2Former's ADE20K semantic setting): not run here (needs TensorFlow for TFDS `scene_parse150`, the files, and a
pre-trained ViT-L checkpoint).

Command:
  python -m maskjax.main --config=configs/eomt_ade20k.py --workdir=workdirs/eomt_ade20k \
      --config.init_from.workdir=workdirs/vit_l16_pretrained
Arguments: runlocal (a tiny variant with the same keys, for the config tests).
Runtime and result here: not run. EoMT reports ADE20K semantic results in its paper (not in the stored reference:
unverified, so no number is quoted here).

Settings as configs/eomt_coco_panoptic.py (EoMT's code defaults, maskjax's differences listed there) with 150
queries, 40k steps at batch 16 (Mask2Former's ADE20K schedule is 160k at batch 16 from memory; EoMT's is
shorter, unverified), no instances (segmentation.max_instances=0).
"""

import ml_collections

from maskjax.train.config import base_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("runlocal",), "configs/eomt_ade20k.py")
    c = base_config("segmentation", "eomt")
    c.data.name = "tfds:scene_parse150"
    c.data.image_size = 512
    c.data.eval_split = "validation"
    c.data.augment = False
    c.model.variant = "L/16"
    c.model.num_registers = 4
    c.model.layer_scale_init = 1e-5
    c.model.drop_path_rate = 0.0
    c.model.num_classes = 150
    c.model.num_queries = 150  # >= the 150 stuff slots
    c.model.num_mask_blocks = 4
    c.model.dtype = "bfloat16"
    c.segmentation.num_stuff_classes = 150
    c.segmentation.max_instances = 0
    c.segmentation.num_points = 12544
    c.segmentation.crop_scale = (0.25, 1.0)
    c.batch_size = 16
    c.total_steps = 40_000
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 0.05
    c.optimizer.warmup_steps = 500
    c.evals.eval.every = 4000
    c.evals.eval.examples = 2000
    c.checkpoint_every = 2000
    if args.get("runlocal"):
        c.data.image_size = 32
        c.model.variant = "mu/8"
        c.model.num_registers = 0
        c.model.num_mask_blocks = 1
        c.model.dtype = "float32"
        c.total_steps = 2
        c.optimizer.warmup_steps = 1
        c.evals.eval.examples = 8
    return c
