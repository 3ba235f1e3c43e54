"""M2T on the built-in shapes: the transformer of configs/maskgit_builtin.py over the same frozen tokenizer's 8x8
grids, decoded in a fixed Halton order in 8 groups sized by the cosine schedule; trained with masked inputs and
the group attention mask, so decoding caches the keys and values of decoded groups.

Runtime here: about 17.5 minutes for 2000 steps (experiments/results/maskgit_builtin_cost.md). Result
(experiments/results/maskgit_builtin.md): Fréchet distance 12.9 in classifier features, 7.88 bits per token;
cached decoding 1.9x (batch 1) and 2.9x (batch 64) faster than uncached.

Command (after the tokenizer of configs/maskgit_builtin.py):
  python -m maskjax.main --config=configs/m2t_builtin.py --workdir=workdirs/m2t_builtin \
      --config.m2t.tokenizer_workdir=workdirs/tokenizer_builtin
Smaller and faster (tests): --config=configs/m2t_builtin.py:runlocal (with a runlocal tokenizer).
Arguments (comma-separated key=value after ':'): runlocal, steps=<int>, tokenizer=<workdir>.
"""

import ml_collections

from maskjax.train.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # The data, transformer, batch and optimizer of configs/maskgit_builtin.py: equal training compute.
    shared = load_config_file("maskgit_builtin.py", next_to=__file__)
    return shared.generator_config("m2t", arg, "configs/m2t_builtin.py")
