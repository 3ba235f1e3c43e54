"""The FSQ tokenizer of configs/tokenizer_builtin.py on Fashion-MNIST: 28x28 grey images -> 7x7 = 49 tokens of 1000
codes (f = 4).

Runtime and result here: not measured yet (`python experiments/maskgit/reproduce.py --dataset fashion_mnist`
writes experiments/results/maskgit_fashion_mnist.md).
Needs the data: `apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist/), or
TensorFlow + internet for TFDS `fashion_mnist`.
Command:
  python -m maskjax.main --config=configs/tokenizer_fashion_mnist.py --workdir=workdirs/tokenizer_fmnist
Smaller and faster (tests): --config=configs/tokenizer_fashion_mnist.py:runlocal
Arguments: as configs/tokenizer_builtin.py (runlocal, quantizer=fsq|vq, steps=<int>).
"""

import importlib.util
import os

import ml_collections


def _builtin():
    spec = importlib.util.spec_from_file_location(
        "tokenizer_builtin", os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer_builtin.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = _builtin().get_config(arg)
    c.data.name = "fashion_mnist"
    c.data.image_size = 28
    c.data.eval_split = "test"
    c.model.channels = 1
    return c
