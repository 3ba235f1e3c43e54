"""Strategies by name, for configs: ``make_masking("block", min_num_patches=16)(key, batch, grid, ratio)``."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from maskjax.masking.core import MaskingResult
from maskjax.masking.strategies import STRATEGIES

MaskingFn = Callable[..., MaskingResult]

_POSITIONAL = ("key", "batch", "grid_hw", "grid_thw", "ratio")


def strategy_options(name: str) -> tuple:
    """The keyword options strategy ``name`` accepts (its keyword-only parameters)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown masking strategy name={name!r}; known: {tuple(STRATEGIES)}")
    params = inspect.signature(STRATEGIES[name]).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def make_masking(name: str, **options: Any) -> MaskingFn:
    """Strategy ``name`` with its static ``options`` bound -> ``fn(key, batch, grid, ratio, **per_call)``.

    Unknown names or options raise ValueError now (not at the first step). Per-call keywords are the
    per-step inputs, e.g. ``scores=`` for "attention" / "hard_patch" and a traced ``alpha=``.

    Example::

        mask_fn = make_masking(config.masking.name, **config.masking.options)
        res = mask_fn(key, batch, (14, 14), config.masking.ratio)
    """
    allowed = strategy_options(name)
    for opt in options:
        if opt in _POSITIONAL:
            raise ValueError(f"option {opt}= is passed at call time, not to make_masking (strategy {name!r})")
        if opt not in allowed:
            raise ValueError(f"unknown option {opt}= for masking strategy {name!r}; allowed: {allowed}")
    return functools.partial(STRATEGIES[name], **options)
