"""Every test process sees 8 CPU devices, so sharded and single-device runs compare in one process."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
