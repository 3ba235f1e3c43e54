"""Convert a run between the unrolled and the scanned block layout (`config.model.scan_layers`).

    python -m maskjax.convert.scan_layout --workdir=workdirs/vit --out=workdirs/vit_scanned [--step=-1]

Writes a new run directory `--out` holding checkpoint `--step` (default: the latest) of `--workdir` with every
encoder's 'block_0' .. 'block_{n-1}' stacked into 'blocks' (or the reverse), in the parameters and in the optimizer
state alike, and the run's config with `model.scan_layers` flipped. Training resumes there exactly where it
stopped: `python -m maskjax.main --config=<the run's config> --workdir=<out> --config.model.scan_layers=<new>`.
"""

import argparse
import json
import os
import sys

import ml_collections

from maskjax.models.layers import params_layout, scan_layout, unrolled_layout
from maskjax.train import checkpoint as ckpt_lib
from maskjax.train import workdir as workdir_lib

COMMAND = "python -m maskjax.convert.scan_layout --workdir={workdir} --out=<new workdir>"


def convert_run(workdir: str, out: str, step: int = -1) -> tuple[int, bool]:
    """Writes `out` (must not hold checkpoints) from checkpoint `step` (-1 = latest) of the run in `workdir`;
    returns (step, scan_layers of the new run). ValueErrors name the workdir, step or layout problem."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"--workdir={workdir!r} has no config.json (not a maskjax run)")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if "scan_layers" not in config.model:
        raise ValueError(f"--workdir={workdir!r}: model {config.model.get('name')!r} has no scan_layers setting")
    if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
        raise ValueError(f"--out={out!r} already holds checkpoints; pick a new directory")
    source = ckpt_lib.Checkpointer(workdir, keep=1, async_save=False)
    try:
        step = source.latest_step() if step < 0 else step
        if step is None or step not in source.all_steps():
            raise ValueError(f"--workdir={workdir!r}: no checkpoint at step {step} (found {source.all_steps()})")
        meta = source.read_meta(step)
        state = source.restore_numpy(step)
    finally:
        source.close()
    layout = params_layout(state["params"])
    expected = "scanned" if config.model.scan_layers else "unrolled"
    if layout != expected:
        raise ValueError(f"--workdir={workdir!r} step {step}: its parameters are in the {layout} layout, but its "
                         f"config says model.scan_layers={config.model.scan_layers}")
    scan = not config.model.scan_layers
    converted = scan_layout(state) if scan else unrolled_layout(state)
    config.model.scan_layers = scan
    meta = {k: v for k, v in meta.items() if k != "digest"}  # the new arrays get their own digest
    if isinstance(meta.get("config"), dict) and "model.scan_layers" in meta["config"]:
        meta["config"] = dict(meta["config"], **{"model.scan_layers": scan})
    os.makedirs(out, exist_ok=True)
    target = ckpt_lib.Checkpointer(out, keep=1, async_save=False)
    try:
        target.save(step, converted, meta)
        target.wait()
    finally:
        target.close()
    workdir_lib.atomic_write(os.path.join(out, "config.json"), config.to_json_best_effort(indent=2))
    return step, scan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="the run to convert")
    parser.add_argument("--out", required=True, help="the new run directory")
    parser.add_argument("--step", type=int, default=-1, help="checkpoint step (-1 = latest)")
    args = parser.parse_args(argv)
    try:
        step, scan = convert_run(args.workdir, args.out, args.step)
    except ValueError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {args.out}: step {step} in the {'scanned' if scan else 'unrolled'} layout. Resume with "
          f"--workdir={args.out} --config.model.scan_layers={scan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
