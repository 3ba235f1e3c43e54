"""ViT with local attention on the patch grid (built-in data): every patch attends to its (2r+1) x (2r+1)
neighbourhood, the cls token to everything; or shifted Swin windows; or LookHere directional heads.

Commands:
  python -m maskjax.main --config=configs/vit_local_window.py --workdir=workdirs/vit_window
  python -m maskjax.main --config=configs/vit_local_window.py:mask=swin --workdir=workdirs/vit_swin
  python -m maskjax.main --config=configs/vit_local_window.py:mask=directional_2d --workdir=workdirs/vit_lookhere
Arguments (comma-separated key=value after ':'): runlocal, mask=window_2d|swin|directional_2d, radius=<int>,
steps=<int>. Any other attention key: --config.model.attention.<key>=... (see maskjax/train/config.py).
"""

import ml_collections

from maskjax.train.config import load_config_file, parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, ("runlocal", "mask", "radius", "steps"), "configs/vit_local_window.py")
    base_arg = ",".join(f"{k}={v}" if v is not True else k for k, v in args.items() if k in ("runlocal", "steps"))
    c = load_config_file("vit_builtin.py", next_to=__file__).get_config(base_arg or None)
    a = c.model.attention
    a.mask = args.get("mask", "window_2d")
    radius = int(args.get("radius", 2))
    a.radius = (radius, radius)  # 5x5 patches of the 8x8 grid at the default radius 2
    a.window = (4, 4)  # swin: 4x4-patch windows, odd blocks shifted by 2
    heads = 2 if args.get("runlocal") else 3
    a.directions = tuple(float(360 * h / heads) for h in range(heads))  # directional_2d: one view per head
    a.fov = 180.0
    return c
