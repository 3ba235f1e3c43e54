"""Import PyTorch-side packages (timm, transformers) next to the CPU torch wheel.

PyPI's torchvision is built against the CUDA torch; with the CPU torch wheel its compiled extension does not load,
and `import torchvision` (imported by timm and by transformers' image utilities) then fails while registering
fake kernels for `torchvision::nms`, an op that does not exist. Declaring the op schemas lets the pure-Python
parts import; nothing in maskjax calls them. See experiments/setup_bench.sh for the install recipe.
"""

from typing import Any

_LIBRARIES: list = []  # Keeps the torch.library registrations alive for the life of the process.


def register_missing_torchvision_ops(torch: Any = None) -> None:
    """Defines `torchvision::nms`/`qnms` schemas when torchvision's compiled ops are not loaded (idempotent)."""
    if torch is None:
        import torch
    try:
        torch.ops.torchvision.nms  # noqa: B018  (exists when torchvision's _C is loaded or already declared)
        return
    except (AttributeError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARIES.append(library)


def import_torch() -> Any:
    """`import torch` with torchvision's missing op schemas declared, so timm and transformers import next."""
    import torch
    register_missing_torchvision_ops(torch)
    return torch
