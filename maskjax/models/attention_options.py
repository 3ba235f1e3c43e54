"""How a model's attention runs and which token mask it uses: two small hashable settings objects.

Models take them as fields (Flax module fields must be hashable); `maskjax.tasks` builds them from the
`config.model.attention` keys. Nothing here reads a config.

    opts = AttentionOptions(backend="approx", approx_degree=2, logit_bound=3.0, record_max_logit=True)
    spec = TokenMaskSpec(kind="window_2d", radius=(2, 2))
    vit = ViT(num_classes=10, patch_size=4, attention=opts, token_mask=spec)
"""

import dataclasses
from typing import Optional

from maskjax.attention import masks as M
from maskjax.attention.api import BACKENDS
from maskjax.attention.approx import APPROX_MODES

TOKEN_MASK_KINDS = ("none", "window_2d", "swin", "directional_2d")


def _pair(value, name: str) -> tuple[int, int]:
    values = (value, value) if isinstance(value, int) else tuple(value)
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{name}={value!r} must be an int or a pair of ints")
    return values


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Backend and kernel settings of every attention call in a model.

    Attributes:
      backend: 'auto' | 'reference' | 'blocked' | 'pallas' | 'splash' | 'cudnn' | 'approx' (see
        `maskjax.attention.attention`).
      block_q, block_k: tile sizes of 'blocked' / 'pallas' (None: the backend's default).
      approx_mode, approx_degree, approx_window: settings of the 'approx' backend (`approx.approx_attention`).
      approx_layers: None, or the block indices that use backend 'approx' while the others use `backend`
        (which must then be exact). With backend='approx' and approx_layers=None every layer is approximate.
      logit_bound: > 0: q and k are L2-normalised and q is scaled by a learned per-head temperature in
        (0, logit_bound), so every logit |q·k| <= logit_bound (`approx_bounded.BoundedLogitScale`), the premise
        of the low-rank approximation. 0: ordinary scaled dot-product logits.
      record_max_logit: sow the observed max |logit| of every attention call into the 'intermediates'
        collection as 'max_abs_logit' (exact up to 4096 x 4096 scores, else the Cauchy–Schwarz bound).
    """

    backend: str = "auto"
    block_q: Optional[int] = None
    block_k: Optional[int] = None
    approx_mode: str = "lowrank"
    approx_degree: int = 2
    approx_window: Optional[int] = None
    approx_layers: Optional[tuple] = None
    logit_bound: float = 0.0
    record_max_logit: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"AttentionOptions: backend={self.backend!r} must be one of {BACKENDS}")
        if self.approx_mode not in APPROX_MODES:
            raise ValueError(f"AttentionOptions: approx_mode={self.approx_mode!r} must be one of {APPROX_MODES}")
        if self.approx_degree < 2 or self.approx_degree % 2:
            raise ValueError(f"AttentionOptions: approx_degree={self.approx_degree} must be an even int >= 2")
        if self.approx_window is not None and self.approx_window < 1:
            raise ValueError(f"AttentionOptions: approx_window={self.approx_window} must be None or >= 1")
        for name in ("block_q", "block_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"AttentionOptions: {name}={getattr(self, name)} must be None or >= 1")
        if self.logit_bound < 0:
            raise ValueError(f"AttentionOptions: logit_bound={self.logit_bound} must be >= 0 (0 = off)")
        if self.approx_layers is not None:
            object.__setattr__(self, "approx_layers", tuple(int(i) for i in self.approx_layers))
            if self.backend == "approx":
                raise ValueError("AttentionOptions: with approx_layers set, backend is the exact backend of the "
                                 "other layers and must not be 'approx'")

    def for_layer(self, index: int, depth: int) -> "AttentionOptions":
        """The options of block `index` of `depth` (resolves approx_layers into that block's backend)."""
        if self.approx_layers is None:
            return self
        bad = [i for i in self.approx_layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"AttentionOptions: approx_layers={self.approx_layers} has indices {bad} outside "
                             f"[0, depth={depth})")
        backend = "approx" if index in self.approx_layers else self.backend
        return dataclasses.replace(self, backend=backend, approx_layers=None)

    def call_kwargs(self) -> dict:
        """Keyword arguments of `maskjax.attention.attention` for these options."""
        kwargs = dict(backend=self.backend, block_q=self.block_q, block_k=self.block_k)
        if self.backend == "approx":
            kwargs.update(approx_mode=self.approx_mode, approx_degree=self.approx_degree,
                          approx_window=self.approx_window)
        return kwargs


@dataclasses.dataclass(frozen=True)
class TokenMaskSpec:
    """A token mask defined on the patch grid, built when the grid size is known (so one spec serves any
    image size). Prefix tokens (cls, registers) follow `prefix_sees_grid` / `grid_sees_prefix`.

    kind:
      'none'            no mask.
      'window_2d'       NAT-style neighbourhood: |dr| <= radius[0]·dilation[0], |dc| <= radius[1]·dilation[1]
                        on the dilated sub-grid (`masks.window_2d(mode='neighborhood')`).
      'swin'            Swin partitions of size `window`; with `shifted=True` odd blocks shift the partition by
                        window // 2 (Swin's shifted windows, without wrap-around).
      'directional_2d'  LookHere: head h sees a `fov`-degree cone around `directions[h]` (one per head),
                        optionally limited to `max_distance` grid units.
    Example: TokenMaskSpec(kind="window_2d", radius=(2, 2)) gives every patch its 5x5 neighbourhood.
    """

    kind: str = "none"
    radius: tuple = (1, 1)
    dilation: tuple = (1, 1)
    window: tuple = (4, 4)
    shifted: bool = True
    directions: tuple = ()
    fov: float = 90.0
    max_distance: Optional[float] = None
    prefix_sees_grid: bool = True
    grid_sees_prefix: bool = True

    def __post_init__(self):
        if self.kind not in TOKEN_MASK_KINDS:
            raise ValueError(f"TokenMaskSpec: kind={self.kind!r} must be one of {TOKEN_MASK_KINDS}")
        for name in ("radius", "dilation", "window"):
            object.__setattr__(self, name, _pair(getattr(self, name), f"TokenMaskSpec.{name}"))
        object.__setattr__(self, "directions", tuple(float(d) for d in self.directions))
        if min(self.radius) < 0 or min(self.dilation) < 1 or min(self.window) < 1:
            raise ValueError(f"TokenMaskSpec: bad radius={self.radius}, dilation={self.dilation} or "
                             f"window={self.window} (radius >= 0, dilation >= 1, window >= 1)")
        if self.kind == "directional_2d" and not self.directions:
            raise ValueError("TokenMaskSpec: kind='directional_2d' needs directions (one angle per head)")

    def build(self, grid_hw: tuple, num_prefix: int, layer: int = 0) -> Optional[M.Mask]:
        """The mask of block `layer` for a (gh, gw) patch grid after `num_prefix` prefix tokens (None: no mask)."""
        if self.kind == "none":
            return None
        grid = M.TokenGrid(int(grid_hw[0]), int(grid_hw[1]), num_prefix=int(num_prefix))
        prefix = dict(prefix_sees_grid=self.prefix_sees_grid, grid_sees_prefix=self.grid_sees_prefix)
        if self.kind == "window_2d":
            return M.window_2d(grid, radius=self.radius, dilation=self.dilation, **prefix)
        if self.kind == "swin":
            shift = tuple(w // 2 for w in self.window) if self.shifted and layer % 2 else (0, 0)
            return M.window_2d(grid, mode="partition", window=self.window, shift=shift, **prefix)
        return M.directional_2d(grid, directions=self.directions, fov=self.fov, max_distance=self.max_distance,
                                **prefix)

    def varies_by_layer(self) -> bool:
        return self.kind == "swin" and self.shifted
