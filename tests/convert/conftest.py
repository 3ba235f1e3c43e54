"""PyTorch-side fixtures of the conversion tests: torch (CPU), timm and transformers, imported with
torchvision's missing op schema declared (see maskjax/convert/_torch_compat.py). `make test` installs them."""

import pytest

from maskjax.convert._torch_compat import import_torch


@pytest.fixture(scope="session")
def torch():
    torch = import_torch()
    torch.set_num_threads(1)  # Tiny models; keep the shared cores free for the other test worker.
    return torch


@pytest.fixture(scope="session")
def timm(torch):
    import timm
    return timm


@pytest.fixture(scope="session")
def transformers(torch):
    import transformers
    return transformers
