"""The trainer: learning, sharding equivalence, accumulation, checkpoints, NaN handling (8 fake CPU devices)."""

import contextlib
import json
import os
from unittest import mock

import jax
import numpy as np
import pytest

from configs import vit_builtin
from maskjax.train import checkpoint as ckpt_lib
from maskjax.train.metrics import read_jsonl
from maskjax.train.trainer import NonFiniteLossError, Trainer
from tests.configs import override


def tiny_config(**overrides):
    """The runlocal config, quieter and smaller; overrides use '__' for nesting."""
    c = vit_builtin.get_config("runlocal")
    c.progress_bar = False
    c.evals.eval.examples = 200
    c.evals.eval.batch_size = 40
    c.evals.predictions.count = 4
    c.data.num_threads = 0
    return override(c, **overrides)


def run_steps(trainer, num_steps):
    """Trains `num_steps` from a fresh state; returns the state and the per-step losses."""
    state = trainer.initial_state()
    losses = []
    for step, local_batch in trainer.train_loader.iterate(0):
        if step == num_steps:
            break
        state, metrics = trainer.train_step(state, trainer.to_global(local_batch))
        losses.append(float(metrics["loss"]))
    return state, np.array(losses)


def test_short_run_lowers_the_loss(tmp_path):
    # 64 fixed images without augmentation: 40 steps must fit them (the full data set needs far longer).
    trainer = Trainer(tiny_config(total_steps=40, evals__eval__every=20, checkpoint_every=40, data__train_examples=64,
                                  data__augment=False, model__variant="Ti/8", model__depth=2,
                                  model__drop_path_rate=0.0, optimizer__warmup_steps=2), str(tmp_path))
    result = trainer.run()
    records = [json.loads(line) for line in open(result.paths["metrics"])]
    train_losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(5, 41, 5))
    assert train_losses[-1] < 0.5 * train_losses[0], train_losses
    assert [r["step"] for r in records if "eval/accuracy" in r] == [20, 40]
    assert 0.0 <= result.eval_metrics["eval/accuracy"] <= 1.0 and np.isfinite(result.eval_metrics["eval/loss"])
    assert os.listdir(result.paths["tensorboard"]), "no TensorBoard event file"
    assert any(name.endswith(".png") for name in os.listdir(result.paths["images"]))
    assert ckpt_lib.Checkpointer(str(tmp_path)).latest_step() == 40


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    trainer = Trainer(tiny_config(), str(tmp_path_factory.mktemp("one")), devices=jax.devices()[:1])
    state, losses = run_steps(trainer, 3)
    return jax.device_get(state.params), losses


@pytest.mark.parametrize("mesh", [dict(data=8, fsdp=1, model=1),    # data parallel
                                  dict(data=1, fsdp=8, model=1),    # FSDP
                                  dict(data=2, fsdp=2, model=2)],   # data x FSDP x tensor parallel
                         ids=["dp", "fsdp", "dp_fsdp_tp"])
def test_sharded_training_matches_one_device(tmp_path, mesh, one_device_run):
    single_params, single_losses = one_device_run
    config = tiny_config()
    config.mesh.update(mesh)
    sharded = Trainer(config, str(tmp_path), devices=jax.devices()[:8])
    sharded_state, sharded_losses = run_steps(sharded, 3)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(single_params), jax.tree.leaves(jax.device_get(sharded_state.params))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    specs = [str(leaf.sharding.spec) for leaf in jax.tree.leaves(sharded_state.params)]
    for axis in ("fsdp", "model"):
        if mesh[axis] > 1:
            assert any(axis in spec for spec in specs), (axis, specs)


def test_gradient_accumulation_equals_full_batch(tmp_path):
    full = Trainer(tiny_config(model__drop_path_rate=0.0), str(tmp_path / "full"))
    full_state, full_losses = run_steps(full, 2)
    accumulated = Trainer(tiny_config(model__drop_path_rate=0.0, optimizer__accum_steps=4), str(tmp_path / "acc"))
    acc_state, acc_losses = run_steps(accumulated, 2)
    np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(full_state.params)),
                    jax.tree.leaves(jax.device_get(acc_state.params))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


def test_restore_onto_another_mesh(tmp_path):
    writer = Trainer(tiny_config(total_steps=3, checkpoint_every=3, evals__eval__every=0, evals__predictions__every=-1,
                                 optimizer__warmup_steps=1,
                                 mesh__data=1, mesh__fsdp=8), str(tmp_path))
    writer.run()
    saved = jax.device_get(writer.state.params)
    reader = Trainer(tiny_config(mesh__data=4, mesh__model=2), str(tmp_path), devices=jax.devices()[:8])
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
    restored = reader.restore(checkpointer, 3)
    assert int(restored.step) == 3
    for leaf in jax.tree.leaves(restored.params):
        assert leaf.sharding.mesh.shape == reader.mesh.shape
    jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(restored.params))
    # A single device works too.
    single = Trainer(tiny_config(), str(tmp_path), devices=jax.devices()[:1]).restore(checkpointer, 3)
    jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(single.params))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(total_steps=30, checkpoint_every=2, evals__eval__every=0, async_checkpointing=False),
                      str(tmp_path))
    honest_step = trainer.train_step

    def step_that_diverges_at_5(state, batch):
        state, metrics = honest_step(state, batch)
        if int(state.step) == 5:
            metrics = dict(metrics, loss=np.float32(np.nan))
        return state, metrics

    trainer.train_step = step_that_diverges_at_5
    with pytest.raises(NonFiniteLossError, match="step 5.*last good checkpoint is step 4"):
        trainer.run()
    assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [2, 4]


@contextlib.contextmanager
def no_device_to_host_reads():
    """JAX's transfer guard (which catches every device-to-host copy on TPU/GPU), plus a patch of the ways a jax
    Array is read on the host, so that the CPU, where the guard sees no transfer, also fails. (np.asarray of a CPU
    array reads its buffer directly and is not caught here.)"""
    from jax._src import array

    def forbidden(*_, **__):
        raise AssertionError("a device-to-host read in a step that is not a log step")

    patches = [mock.patch.object(jax, "device_get", forbidden),
               mock.patch.object(array.ArrayImpl, "_value", property(forbidden))]
    patches += [mock.patch.object(array.ArrayImpl, name, forbidden)
                for name in ("__array__", "__float__", "__int__", "__bool__", "__index__", "item", "tolist")]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(jax.transfer_guard_device_to_host("disallow"))
        yield


def test_the_guard_catches_the_reads_of_a_per_step_fetch():
    metrics = {"loss": jax.numpy.ones(()) * 2}
    for read in (lambda: jax.device_get(metrics), lambda: float(metrics["loss"]),
                 lambda: np.isfinite(metrics["loss"].item())):
        with pytest.raises(AssertionError, match="device-to-host"), no_device_to_host_reads():
            read()


def test_steps_between_log_points_never_read_from_the_devices(tmp_path):
    trainer = Trainer(tiny_config(total_steps=9, log_every=3, checkpoint_every=9, evals__eval__every=0,
                                  evals__predictions__every=-1, profile_steps=(4, 5)), str(tmp_path),
                      devices=jax.devices()[:2])
    guarded = []

    def guard():
        guarded.append(True)
        return no_device_to_host_reads()

    trainer.step_guard = guard
    result = trainer.run()
    assert len(guarded) == 6  # steps 1, 2, 4, 5, 7, 8; steps 3, 6, 9 log
    records = [r for r in read_jsonl(result.paths["metrics"]) if "train/loss" in r]
    assert [r["step"] for r in records] == [3, 6, 9]
    # Throughput: model TFLOP/s per device = steps/s x model FLOPs per step / devices; no MFU without a known peak.
    basis = trainer.throughput_basis()
    assert basis["devices"] == 2 and basis["peak_flops"] is None and basis["model_flops"] > 0
    for r in records:
        steps_per_second = r["train/images_per_second"] / trainer.config.batch_size
        np.testing.assert_allclose(r["train/model_tflops_per_device"],
                                   steps_per_second * basis["model_flops"] / 2 / 1e12, rtol=1e-9)
        assert "train/mfu" not in r
    traces = [f for _, _, files in os.walk(os.path.join(str(tmp_path), "profile")) for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces


def test_logged_metrics_are_window_means(tmp_path):
    config = tiny_config(total_steps=6, log_every=3, checkpoint_every=6, evals__eval__every=0,
                         evals__predictions__every=-1, optimizer__schedule="warmup_linear", optimizer__warmup_steps=3)
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
    _, losses = run_steps(Trainer(config, str(tmp_path / "ref"), devices=jax.devices()[:1]), 6)
    result = trainer.run()
    records = [r for r in read_jsonl(result.paths["metrics"]) if "train/loss" in r]
    np.testing.assert_allclose([r["train/loss"] for r in records], [losses[:3].mean(), losses[3:].mean()],
                               rtol=1e-5)
    schedule = trainer.schedule
    np.testing.assert_allclose(records[0]["train/learning_rate"], np.mean([schedule(s) for s in range(3)]),
                               rtol=1e-6)


def test_a_non_finite_loss_between_log_steps_is_caught_before_the_next_save(tmp_path):
    trainer = Trainer(tiny_config(total_steps=20, log_every=10, checkpoint_every=4, evals__eval__every=0,
                                  evals__predictions__every=-1, async_checkpointing=False), str(tmp_path),
                      devices=jax.devices()[:1])
    honest_step = trainer.train_step

    def step_that_diverges_at_6(state, batch):
        state, metrics = honest_step(state, batch)
        if int(state.step) in (6, 7):
            metrics = dict(metrics, loss=np.float32(np.inf))
        return state, metrics

    trainer.train_step = step_that_diverges_at_6
    with pytest.raises(NonFiniteLossError, match=r"at step 6 \(2 non-finite of the steps 1-8 since the last log step.*last good "
                                                 r"checkpoint is step 4"):
        trainer.run()
    assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [4]
