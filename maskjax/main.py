"""Command line: `python -m maskjax.main --config=configs/x.py[:arg] --workdir=DIR [--config.key=value ...]`.

Multi-host: pass --coordinator_address/--num_processes/--process_id (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed=auto on clusters that JAX detects (TPU pods, SLURM).
"""

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                                      "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")),
                                   "Index of this process.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                                 "'auto': jax.distributed.initialize() with cluster auto-detection.")
_NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", 0,
                                        "Simulate this many CPU devices per process (0 = leave as is).")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a readable error for mistyped --config.<key> overrides."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
        from maskjax.train.config import base_config, flat_keys, unknown_key_message
        valid = flat_keys(base_config())  # Every config file starts from this schema.
        overrides = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
        unknown = [key for key in overrides if key not in valid] or overrides or [str(error)]
        sys.exit(f"Error: {unknown_key_message(unknown[0], valid)}")
    except flags.Error as error:
        sys.exit(f"Error: {error}\nPass --helpfull to see all flags.")


def main(argv: list[str]) -> None:
    del argv
    if _CONFIG.value is None or not _WORKDIR.value:
        sys.exit("Error: --config and --workdir are required, e.g. "
                 "`python -m maskjax.main --config=configs/vit_builtin.py --workdir=workdirs/vit`")
    import jax  # After flag parsing so device-count flags apply before the backend starts.
    if _NUM_CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
    if _COORDINATOR.value and _NUM_PROCESSES.value > 1:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value == "auto":
        jax.distributed.initialize()
    from maskjax.train.trainer import Trainer, summary_lines
    # Library chatter (orbax logs every save at INFO) would drown the progress bar.
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        trainer = Trainer(_CONFIG.value, _WORKDIR.value)
    except ValueError as e:
        sys.exit(f"Error: {e}")
    result = trainer.run()
    if jax.process_index() == 0:
        print("\n".join(summary_lines(result)), flush=True)
    if result.preempted:
        sys.exit(143)  # Preempted (SIGTERM): non-zero so schedulers requeue the job; it resumes from the checkpoint.


def run() -> None:
    """Console-script entry point (`maskjax --config=... --workdir=...`)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
