"""Mask2Former-style segmentation on the built-in panoptic shapes (64x64): the ViT-Ti/8 backbone of
configs/eomt_builtin.py, a simple ViTDet pyramid (4x4, 8x8, 16x16) with a light pixel decoder, and a 6-layer
masked-attention transformer decoder (dim 128, 16 queries); `--config.model.masked_attention=False` gives plain
cross-attention (the ablation of experiments/segmentation/).

Command:
  python -m maskjax.main --config=configs/mask2former_builtin.py --workdir=workdirs/mask2former_builtin
Smaller and faster (tests, notebook): --config=configs/mask2former_builtin.py:runlocal
Arguments (comma-separated key=value after ':'): runlocal, steps=<int>, size=<image side>.
Runtime and result here (experiments/results/segmentation_builtin.md, seed 0; made by
`python experiments/segmentation/reproduce.py --seeds 0 --studies masked,heads,annealing,points,remax
--report-only` after the runs of
`python experiments/segmentation/reproduce.py --seeds 0`, which evaluate every 250 steps on 500 images):
~39 minutes of training steps on 2 cores for the 2000 steps, PQ 45.5 (things 46.7, stuff 43.1), mIoU 58.3; with
--config.model.masked_attention=False PQ 39.3, mIoU 54.9. Fine-tuned from an MAE-pretrained backbone
(experiments/results/segmentation_pretrained.md, seed 0, its command there; --config.model.posemb=sincos2d
--config.init_from.workdir=<MAE run> --config.init_from.params_key=encoder --config.init_from.target_key=backbone):
PQ 60.1 (things 54.2, stuff 71.8), mIoU 71.6, ~69 minutes on one core.
"""

import ml_collections

from maskjax.train.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # Data, backbone, steps, batch and optimizer of configs/eomt_builtin.py: the heads compare at equal budget.
    shared = load_config_file("eomt_builtin.py", next_to=__file__)
    return shared.segmentation_config("mask2former", arg, "configs/mask2former_builtin.py")
