"""Whole runs through the command line in subprocesses: SIGKILL + resume, SIGTERM, two processes."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from maskjax.train import checkpoint as ckpt_lib
from maskjax.train.metrics import read_jsonl
from maskjax.train.trainer import Trainer
from tests.train.test_trainer import tiny_config

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--config=configs/vit_builtin.py:runlocal", "--config.progress_bar=False", "--config.evals.eval.every=0",
          "--config.evals.eval.examples=100", "--config.evals.eval.batch_size=20",
          "--config.evals.predictions.every=-1",
          "--config.log_every=1"]


def main_command(workdir, *extra):
    return [sys.executable, "-m", "maskjax.main", f"--workdir={workdir}", *COMMON, *extra]


def child_env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.pop("XLA_FLAGS", None)
    return env


def finished_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def restored_params(workdir, step):
    trainer = Trainer(tiny_config(), workdir, devices=jax.devices()[:1])
    return jax.device_get(trainer.restore(ckpt_lib.Checkpointer(workdir), step).params)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    args = ["--config.total_steps=24", "--config.checkpoint_every=4"]
    straight = tmp_path / "straight"
    subprocess.run(main_command(straight, *args), cwd=REPO, env=child_env(), check=True, timeout=600,
                   capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(main_command(killed, *args), cwd=REPO, env=child_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not finished_steps(killed) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps_at_kill = finished_steps(killed)
    assert steps_at_kill and steps_at_kill[-1] < 24, f"kill came too late: {steps_at_kill}"
    subprocess.run(main_command(killed, *args), cwd=REPO, env=child_env(), check=True, timeout=600,
                   capture_output=True)
    a, b = restored_params(str(straight), 24), restored_params(str(killed), 24)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # The resumed run logged the same losses as the straight run for the steps it recomputed.
    straight_loss = {r["step"]: r["train/loss"] for r in read_jsonl(straight / "metrics.jsonl") if "train/loss" in r}
    for record in filter(lambda r: "train/loss" in r, read_jsonl(killed / "metrics.jsonl")):
        assert record["train/loss"] == straight_loss[record["step"]]


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    process = subprocess.Popen(main_command(tmp_path, "--config.total_steps=100000", "--config.checkpoint_every=1000"),
                               cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(read_jsonl(metrics)) >= 3:
            break
        time.sleep(0.1)
    # A second run on the same workdir refuses, naming the live one, and changes nothing.
    second = subprocess.run(main_command(tmp_path, "--config.total_steps=100000"), cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 1 and f"in use by PID {process.pid} on host {socket.gethostname()}" in second.stderr
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 143, output[-2000:]
    steps = finished_steps(str(tmp_path))
    assert len(steps) == 1 and 3 <= steps[0] < 1000, steps
    assert max(r["step"] for r in read_jsonl(metrics)) == steps[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    args = ["--config.total_steps=6", "--config.checkpoint_every=6", "--config.batch_size=32"]
    one = tmp_path / "one"
    subprocess.run(main_command(one, *args, "--num_cpu_devices=4"), cwd=REPO, env=child_env(), check=True,
                   timeout=600, capture_output=True)
    two = tmp_path / "two"
    address = f"127.0.0.1:{_free_port()}"
    processes = [subprocess.Popen(
        main_command(two, *args, "--num_cpu_devices=2", f"--coordinator_address={address}", "--num_processes=2",
                     f"--process_id={i}"),
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    losses_one = [r["train/loss"] for r in read_jsonl(one / "metrics.jsonl") if "train/loss" in r]
    losses_two = [r["train/loss"] for r in read_jsonl(two / "metrics.jsonl") if "train/loss" in r]
    assert len(losses_one) == len(losses_two) == 6
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)
    a, b = restored_params(str(one), 6), restored_params(str(two), 6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--num_processes=2", "--process_id=1"], "--num_processes=2 needs --coordinator_address"),
    (["--num_processes=2", "--process_id=2", "--coordinator_address=127.0.0.1:1"], "--process_id=2: must be in"),
])
def test_multi_process_flags_that_cannot_work_stop_the_run(tmp_path, flags, message):
    result = subprocess.run(main_command(tmp_path, *flags), cwd=REPO, env=child_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and message in result.stderr
    assert not os.listdir(tmp_path)


def test_a_coordinator_whose_peers_never_join_says_so_at_the_timeout(tmp_path):
    start = time.time()
    result = subprocess.run(main_command(tmp_path, "--num_processes=2", "--process_id=0",
                                         f"--coordinator_address=127.0.0.1:{_free_port()}",
                                         "--config.distributed_timeout=3"),
                            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Waiting up to 3 s (config.distributed_timeout) for 2 processes" in result.stdout
    assert "did not start: waited 3 s" in result.stderr and time.time() - start < 60
