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

from maskjax.train.config import load_config_file, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    runlocal = parse_config_arg(arg, ("runlocal",), "configs/eomt_ade20k.py").get("runlocal")
    c = load_config_file("eomt_coco_panoptic.py", next_to=__file__).get_config(arg)
    c.data.name = "tfds:scene_parse150"
    c.model.num_classes = 150
    c.model.num_queries = 150  # >= the 150 stuff slots
    c.segmentation.num_stuff_classes = 150
    c.segmentation.max_instances = 0
    c.total_steps = 40_000
    c.evals.eval.every = 4000
    c.evals.eval.examples = 2000
    if runlocal:  # the recipe's tiny variant (its image size, 2 steps, 8 eval examples)
        c.total_steps = 2
        c.evals.eval.examples = 8
    else:
        c.data.image_size = 512
    return c
