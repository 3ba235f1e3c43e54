"""EoMT-L on COCO panoptic at 640x640: the recipe of the EoMT paper's main COCO result (not run here: needs
TensorFlow for the TFDS `coco/2017_panoptic` builder, the COCO files, and a DINOv2-style ViT-L checkpoint).

Command (with the data in $TFDS_DATA_DIR and a pre-trained ViT-L/16 run to start from):
  python -m maskjax.main --config=configs/eomt_coco_panoptic.py --workdir=workdirs/eomt_coco \
      --config.init_from.workdir=workdirs/vit_l16_pretrained
Arguments: runlocal (a tiny variant with the same keys, for the config tests).
Runtime and result here: not run (no COCO, no accelerator). EoMT reports 56.0 PQ for EoMT-L at 640 on COCO val
(H100, ../shared/reference: the tue-mps/eomt model zoo).

Settings from the EoMT code (tue-mps/eomt @7bd19dd, via ../shared/reference/maskgit-segmentation.md): 200 queries,
L = 4 masked blocks, mask annealing per block, loss weights 2/5/5 and no-object 0.1, 12544 points, oversample 3,
importance 0.75, lr 1e-4, weight decay 0.05, thresholds 0.8 / 0.8. maskjax's choices where it differs: no layer-wise
lr decay (EoMT: 0.8; maskjax has no LLRD yet), a cosine schedule instead of EoMT's warmup-poly, crowd regions are
void (maskjax.data.panoptic), square resize instead of EoMT's aspect-preserving resize + pad (unverified impact).
"""

import ml_collections

from maskjax.train.config import base_config, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("runlocal",), "configs/eomt_coco_panoptic.py")
    c = base_config("segmentation", "eomt")
    c.data.name = "tfds:coco/2017_panoptic"
    c.data.image_size = 640
    c.data.eval_split = "validation"
    c.data.augment = False  # the task's random resized crop below replaces the pad-and-crop
    c.model.variant = "L/16"
    c.model.num_registers = 4  # DINOv2 with registers
    c.model.layer_scale_init = 1e-5
    c.model.drop_path_rate = 0.0
    c.model.num_classes = 133  # 53 stuff + 80 things (maskjax.data.panoptic order: stuff first)
    c.model.num_queries = 200
    c.model.num_mask_blocks = 4
    c.model.mask_annealing = "poly"
    c.model.dtype = "bfloat16"
    c.segmentation.num_stuff_classes = 53
    c.segmentation.max_instances = 147  # 200 queries - 53 stuff slots
    c.segmentation.num_points = 12544
    c.segmentation.crop_scale = (0.25, 1.0)  # EoMT: large-scale jitter 0.1-2.0 (unverified equivalence)
    c.batch_size = 16
    c.total_steps = 92_000  # ~12 epochs of COCO train2017 at batch 16
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 0.05
    c.optimizer.warmup_steps = 500
    c.evals.eval.every = 5000
    c.evals.eval.examples = 5000
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
