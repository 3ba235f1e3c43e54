"""Per-pixel semantic segmentation baseline on the built-in shapes (64x64): the ViT-Ti/8 backbone of
configs/eomt_builtin.py with a linear classifier on every patch token, logits upsampled bilinearly (mIoU only, no
panoptic output).

Command:
  python -m maskjax.main --config=configs/perpixel_builtin.py --workdir=workdirs/perpixel_builtin
Smaller and faster (tests, notebook): --config=configs/perpixel_builtin.py:runlocal
Arguments (comma-separated key=value after ':'): runlocal, steps=<int>, size=<image side>.
Runtime and result here (experiments/results/segmentation_builtin.md, seed 0; made by
`python experiments/segmentation/reproduce.py --seeds 0 --studies masked,heads,annealing,points,remax
--report-only` after the runs of
`python experiments/segmentation/reproduce.py --seeds 0`): ~19 minutes of training steps on one core for the 2000
steps, mIoU 48.4 on 500 validation images.
"""

import ml_collections

from maskjax.train.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # Data, backbone, steps, batch and optimizer of configs/eomt_builtin.py: the heads compare at equal budget.
    shared = load_config_file("eomt_builtin.py", next_to=__file__)
    return shared.segmentation_config("perpixel", arg, "configs/perpixel_builtin.py")
