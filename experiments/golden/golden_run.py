"""The golden run: a tiny fixed-seed training run whose per-step losses are committed, so that a change in numerics,
from maskjax's code or from a dependency upgrade, fails a test (tests/test_golden_run.py) instead of going unseen.

    python experiments/golden/golden_run.py      # re-record experiments/golden/vit_builtin_losses.json

Re-record only for an intended change of numerics, and say why in the commit. The run: configs/vit_builtin.py
:runlocal (ViT-mu/4 on the built-in shapes, 32x32), 50 steps at batch 32 (warm-up 2), seed 0, one device, the loss of every step.
It is recorded with XLA's CPU backend optimisation off (JAX_DISABLE_MOST_OPTIMIZATIONS=1), as the test suite runs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GOLDEN = os.path.join(HERE, "vit_builtin_losses.json")
STEPS = 50
# A fresh run must match the record to this relative tolerance at every step: well above what compiling with XLA's
# backend optimisation on instead of off changes, well below what a learning rate 0.1 % off changes (both measured
# by this script and recorded in the JSON under 'sensitivity').
RTOL = 5e-6


def golden_config():
    sys.path.insert(0, ROOT)
    from maskjax.train.config import load_config_file

    c = load_config_file(os.path.join(ROOT, "configs", "vit_builtin.py")).get_config("runlocal")
    c.total_steps = STEPS
    c.optimizer.warmup_steps = 2  # the loss moves from the first steps on, so the record is sensitive
    c.log_every = 1
    c.checkpoint_every = STEPS
    c.progress_bar = False
    c.async_checkpointing = False
    c.data.num_threads = 0
    for entry in c.evals.values():
        entry.every = -1
    return c


def run_losses(workdir: str, learning_rate_scale: float = 1.0) -> list[float]:
    """The training loss of every step of the golden config, run in `workdir` on one device."""
    import jax

    from maskjax.train.trainer import Trainer

    config = golden_config()
    config.optimizer.learning_rate *= learning_rate_scale
    Trainer(config, workdir, devices=jax.devices()[:1]).run()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    return [losses[step] for step in range(1, STEPS + 1)]


def _fresh_losses(learning_rate_scale: float = 1.0) -> list[float]:
    with tempfile.TemporaryDirectory() as workdir:
        return run_losses(workdir, learning_rate_scale)


def _max_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def main() -> None:
    if "--losses-only" in sys.argv:  # for the optimisation-on comparison, in a process of its own
        print(json.dumps(_fresh_losses()))
        return
    import subprocess

    import flax
    import jax
    import optax

    losses = _fresh_losses()
    optimised = subprocess.run([sys.executable, __file__, "--losses-only"], capture_output=True, text=True,
                               check=True, env={**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"})
    sensitivity = {
        "xla_backend_optimisation_on_vs_off": _max_relative_difference(
            json.loads(optimised.stdout.strip().splitlines()[-1]), losses),
        "learning_rate_0.1_percent_higher": _max_relative_difference(_fresh_losses(1.001), losses)}
    record = {"command": "python experiments/golden/golden_run.py", "config": "configs/vit_builtin.py:runlocal, "
              f"{STEPS} steps, warm-up 2, log_every=1, evaluations off, one device",
              "jax_disable_most_optimizations": os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"],
              "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
              "rtol": RTOL, "sensitivity (max relative loss difference)": sensitivity, "losses": losses}
    with open(GOLDEN, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {GOLDEN}: {len(losses)} losses, {losses[0]:.6f} -> {losses[-1]:.6f}; {sensitivity}")


if __name__ == "__main__":
    main()
