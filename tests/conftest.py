"""Every test process sees 8 CPU devices, so sharded and single-device runs compare in one process."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Most tests compile more than they compute (tiny models, a few steps), and XLA's CPU backend optimisation (LLVM -O2
# and its expensive passes) is most of a compile here. Without it the suite is ~35 % faster; the HLO passes (fusion,
# simplification) still run, and float semantics do not change (no fast-math at any level). Inherited by every
# subprocess the tests start (CLIs, notebooks, multi-process runs). JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite
# as users compile.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
