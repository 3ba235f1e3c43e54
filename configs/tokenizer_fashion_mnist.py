"""The FSQ tokenizer of configs/tokenizer_builtin.py on Fashion-MNIST: 28x28 grey images -> 7x7 = 49 tokens of 1000
codes (f = 4).

Runtime and result here (`python experiments/maskgit/reproduce.py --dataset fashion_mnist`,
experiments/results/maskgit_fashion_mnist.md and _cost.md): 2000 steps take about 13 minutes at the median logged
speed; on the test split it uses 94.9 % of its 1000 codes, perplexity 405, PSNR 24.6 dB.
Needs the data: `apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist/), or
TensorFlow + internet for TFDS `fashion_mnist`.
Command:
  python -m maskjax.main --config=configs/tokenizer_fashion_mnist.py --workdir=workdirs/tokenizer_fmnist
Smaller and faster (tests): --config=configs/tokenizer_fashion_mnist.py:runlocal
Arguments: as configs/tokenizer_builtin.py (runlocal, quantizer=fsq|vq, steps=<int>).
"""

import ml_collections

from maskjax.train.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_config_file("tokenizer_builtin.py", next_to=__file__).get_config(arg)
    c.data.name = "fashion_mnist"
    c.data.image_size = 28
    c.data.eval_split = "test"
    c.model.channels = 1
    return c
