"""Command line: `python -m maskjax.main --config=configs/x.py[:arg] --workdir=DIR [--config.key=value ...]`.

Multi-host: pass --coordinator_address/--num_processes/--process_id (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed=auto on clusters that JAX detects (TPU pods, SLURM).
"""

import os
import sys
import threading
from typing import Optional

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
        from maskjax.train.config import flat_keys, unknown_key_message
        valid = flat_keys(_config_without_overrides(argv))
        overrides = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
        unknown = [key for key in overrides if key not in valid] or overrides or [str(error)]
        sys.exit(f"Error: {unknown_key_message(unknown[0], valid)}")
    except flags.Error as error:
        sys.exit(f"Error: {error}\nPass --helpfull to see all flags.")


def _config_without_overrides(argv: list[str]):
    """The config the --config file builds (its keys depend on its task and model), for naming a mistyped key."""
    spec_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec_arg is None:
        from maskjax.train.config import base_config
        return base_config()
    from maskjax.train.config import load_config_file
    path, _, arg = spec_arg.partition(":")
    return load_config_file(path).get_config(arg or None)


def main(argv: list[str]) -> None:
    del argv
    if _CONFIG.value is None or not _WORKDIR.value:
        sys.exit("Error: --config and --workdir are required, e.g. "
                 "`python -m maskjax.main --config=configs/vit_builtin.py --workdir=workdirs/vit`")
    error = check_process_flags(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    if error:
        sys.exit(f"Error: {error}")
    import jax  # After flag parsing so device-count flags apply before the backend starts.
    if _NUM_CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
    timeout = int(_CONFIG.value.distributed_timeout)
    if _NUM_PROCESSES.value > 1 or _DISTRIBUTED.value == "auto":
        where = (f"{_NUM_PROCESSES.value} processes at {_COORDINATOR.value} (this is process {_PROCESS_ID.value})"
                 if _DISTRIBUTED.value == "off" else "the processes of the detected cluster")
        print(f"Waiting up to {timeout} s (config.distributed_timeout) for {where} to join...", flush=True)
        failure = (f"Error: the multi-process run did not start: waited {timeout} s (config.distributed_timeout) for "
                   f"{where}. Start every process with the same --coordinator_address and --num_processes, or raise "
                   "the timeout.")
        # JAX's own deadline aborts the process from C++ with a stack dump; this watchdog says why first.
        watchdog = threading.Timer(timeout, lambda: (print(failure, file=sys.stderr, flush=True), os._exit(1)))
        watchdog.daemon = True
        watchdog.start()
        try:
            if _DISTRIBUTED.value == "auto":
                jax.distributed.initialize(initialization_timeout=timeout + 60)
            else:
                jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                           process_id=_PROCESS_ID.value, initialization_timeout=timeout + 60)
        except Exception as e:  # noqa: BLE001 - jax raises XlaRuntimeError / RuntimeError / ValueError here
            sys.exit(f"{failure} ({str(e).strip().splitlines()[0] if str(e).strip() else repr(e)})")
        finally:
            watchdog.cancel()
    from maskjax.train.trainer import NonFiniteLossError, ResumeError, Trainer, summary_lines
    from maskjax.train.workdir import WorkdirBusyError
    # Library chatter (orbax logs every save at INFO) would drown the progress bar.
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        trainer = Trainer(_CONFIG.value, _WORKDIR.value)
        result = trainer.run()
    except (ValueError, WorkdirBusyError, NonFiniteLossError) as e:  # ResumeError is a ValueError
        sys.exit(f"Error: {e}")
    if jax.process_index() == 0:
        print("\n".join(summary_lines(result)), flush=True)
    if result.preempted:
        # Non-zero so schedulers requeue the job (it resumes from the checkpoint): 128 + the signal's number.
        sys.exit(130 if result.stop_signal == "SIGINT" else 143)


def check_process_flags(coordinator: Optional[str], num_processes: int, process_id: int, distributed: str) -> str:
    """Why these multi-process flags cannot start the run they describe ('' when they can)."""
    if num_processes < 1:
        return f"--num_processes={num_processes}: must be >= 1"
    if not 0 <= process_id < num_processes:
        return f"--process_id={process_id}: must be in [0, --num_processes={num_processes})"
    if distributed == "auto":
        return ""
    if num_processes > 1 and not coordinator:
        return (f"--num_processes={num_processes} needs --coordinator_address=HOST:PORT of process 0 (or "
                "$JAX_COORDINATOR_ADDRESS, or --distributed=auto on TPU pods and SLURM); without it each process "
                "would run alone on the same workdir")
    if coordinator and num_processes == 1:
        return (f"--coordinator_address={coordinator} was given but --num_processes=1: pass the number of "
                "processes, or drop the coordinator for a single-process run")
    return ""


def run() -> None:
    """Console-script entry point (`maskjax --config=... --workdir=...`)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
