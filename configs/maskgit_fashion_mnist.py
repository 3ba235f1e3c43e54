"""MaskGIT of configs/maskgit_builtin.py on Fashion-MNIST: the class-conditional transformer over the 7x7 token grids
of a frozen FSQ tokenizer (configs/tokenizer_fashion_mnist.py).

Runtime and result here (`python experiments/maskgit/reproduce.py --dataset fashion_mnist`,
experiments/results/maskgit_fashion_mnist.md and _cost.md): 2000 steps take about 31 minutes at the median logged
speed; 8 decoding steps (cosine) give a Fréchet distance of 2.25 in classifier features against the test split
(real-vs-real floor 1.64), the best of 1-32 steps.
Needs the data: `apt-get install dataset-fashion-mnist`, or TensorFlow + internet for TFDS `fashion_mnist`.
Commands (the tokenizer first):
  python -m maskjax.main --config=configs/tokenizer_fashion_mnist.py --workdir=workdirs/tokenizer_fmnist
  python -m maskjax.main --config=configs/maskgit_fashion_mnist.py --workdir=workdirs/maskgit_fmnist \
      --config.maskgit.tokenizer_workdir=workdirs/tokenizer_fmnist
Smaller and faster (tests): --config=configs/maskgit_fashion_mnist.py:runlocal (with a runlocal tokenizer).
Arguments: as configs/maskgit_builtin.py (runlocal, steps=<int>, tokenizer=<workdir>).
"""

import ml_collections

from maskjax.train.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = load_config_file("maskgit_builtin.py", next_to=__file__).get_config(arg)
    c.data.name = "fashion_mnist"
    c.data.image_size = 28
    c.data.eval_split = "test"
    if c.maskgit.tokenizer_workdir == "workdirs/tokenizer_builtin":
        c.maskgit.tokenizer_workdir = "workdirs/tokenizer_fmnist"
    if c.maskgit.tokenizer_workdir == "workdirs/tokenizer_runlocal":
        c.maskgit.tokenizer_workdir = "workdirs/tokenizer_fmnist_runlocal"
    return c
