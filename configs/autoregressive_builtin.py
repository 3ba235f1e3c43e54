"""The autoregressive baseline of MaskGIT on the built-in shapes: the same transformer as configs/maskgit_builtin.py,
causal in raster order over the 8x8 token grids of the same frozen tokenizer, sampled token by token with a
key/value cache.

Runtime here: about 17.5 minutes for 2000 steps (experiments/results/maskgit_builtin_cost.md). Result
(experiments/results/maskgit_builtin.md): Fréchet distance 9.7 in classifier features, 6.96 bits per token.

Command (after the tokenizer of configs/maskgit_builtin.py):
  python -m maskjax.main --config=configs/autoregressive_builtin.py --workdir=workdirs/autoregressive_builtin \
      --config.autoregressive.tokenizer_workdir=workdirs/tokenizer_builtin
Smaller and faster (tests): --config=configs/autoregressive_builtin.py:runlocal (with a runlocal tokenizer).
Arguments (comma-separated key=value after ':'): runlocal, steps=<int>, tokenizer=<workdir>.
"""

import ml_collections

from maskjax.train.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # The data, transformer, batch and optimizer of configs/maskgit_builtin.py: equal training compute.
    shared = load_config_file("maskgit_builtin.py", next_to=__file__)
    return shared.generator_config("autoregressive", arg, "configs/autoregressive_builtin.py")
