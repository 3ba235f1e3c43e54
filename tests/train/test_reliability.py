"""No silent failures (issue 13): damaged checkpoints, changed configs, one run per workdir, replayed metrics,
signals, and data counts checked before any compute. Each test injects the fault the way a user would meet it."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from maskjax.train import checkpoint as ckpt_lib
from maskjax.train import workdir as workdir_lib
from maskjax.train.config import eval_config
from maskjax.train.metrics import read_jsonl
from maskjax.train.trainer import NonFiniteLossError, ResumeError, Trainer
from tests.train.test_trainer import tiny_config

STEPS = 6


def config(**overrides):
    defaults = dict(total_steps=STEPS, checkpoint_every=3, keep_checkpoints=5, evals__eval__every=0, log_every=1,
                    evals__eval__examples=40, evals__predictions__every=-1, async_checkpointing=False, model__depth=1,
                    optimizer__warmup_steps=1)
    return tiny_config(**{**defaults, **overrides})


def trainer(workdir, **overrides):
    return Trainer(config(**overrides), str(workdir), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A workdir with checkpoints at steps 3 and 6, and its parameters at each."""
    workdir = tmp_path_factory.mktemp("base")
    t = trainer(workdir)
    t.run()
    checkpointer = ckpt_lib.Checkpointer(str(workdir))
    params = {s: jax.device_get(t.restore(checkpointer, s).params) for s in (3, 6)}
    checkpointer.close()
    return workdir, params


def copy_run(finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    return workdir


def history(workdir):
    return read_jsonl(os.path.join(workdir, "history.jsonl"))


def largest_array_file(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


# ------------------------------------------------------------------------------------------ damaged checkpoints
def flip_bytes(path):
    data = bytearray(open(path, "rb").read())
    start = len(data) // 3
    for i in range(start, min(start + 400, len(data))):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def empty_step(step_dir):
    for name in os.listdir(step_dir):
        target = os.path.join(step_dir, name)
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)


def garbage(path):
    open(path, "wb").write(b"\xff\xfe not json \x00\x81")


def values_of_step_3(step_dir):
    # Valid files holding other values: only the digest can tell (the arrays decode and have the right shapes).
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(os.path.join(os.path.dirname(step_dir), "3", "state"), os.path.join(step_dir, "state"))


DAMAGE = {
    "bit_flips": lambda d: flip_bytes(largest_array_file(d)),
    "truncated_array_file": lambda d: truncate(largest_array_file(d)),
    "emptied_step": empty_step,
    "garbage_state_metadata": lambda d: garbage(os.path.join(d, "state", "_METADATA")),
    "garbage_meta_json": lambda d: garbage(os.path.join(d, "meta", "metadata")),
    "other_valid_values": values_of_step_3,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_step_is_moved_aside_and_the_previous_one_resumed(finished_run, tmp_path, damage, capsys):
    workdir = copy_run(finished_run, tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "6")
    DAMAGE[damage](step_dir)
    checkpointer = ckpt_lib.Checkpointer(str(workdir))
    t = trainer(workdir)
    resumed = t.resume(checkpointer)
    checkpointer.close()
    assert resumed["step"] == 3 and int(resumed["state"].step) == 3
    jax.tree.map(np.testing.assert_array_equal, finished_run[1][3], jax.device_get(resumed["state"].params))
    (moved,) = resumed["damaged"]
    assert moved[0] == 6 and os.path.isdir(moved[2]) and not os.path.exists(step_dir)
    assert moved[2].startswith(os.path.join(str(workdir), "damaged_checkpoints", "6-"))
    assert open(os.path.join(moved[2], "REASON.txt")).read().strip() == moved[1]
    err = capsys.readouterr().err
    assert "checkpoint step 6" in err
    if damage == "truncated_array_file":  # TensorStore's own reason, not orbax's wrapper with a spec dump
        assert "Requested byte range" in err and "TensorStore({" not in err
    if damage in ("garbage_state_metadata", "garbage_meta_json"):
        assert "/checkpoints/6/" in moved[1]
    assert "Metadata file does not exist" not in err
    assert history(workdir)[-1]["event"] == "damaged_checkpoint" and history(workdir)[-1]["step"] == 6


def test_a_run_over_a_damaged_checkpoint_recomputes_the_lost_steps_exactly(finished_run, tmp_path):
    workdir = copy_run(finished_run, tmp_path)
    flip_bytes(largest_array_file(os.path.join(workdir, "checkpoints", "6")))
    t = trainer(workdir)
    result = t.run()
    assert result.step == STEPS and not result.stopped_early
    jax.tree.map(np.testing.assert_array_equal, finished_run[1][6], jax.device_get(t.state.params))
    assert [r["step"] for r in history(workdir) if r["event"] == "resume"] == [3]


def test_no_intact_checkpoint_stops_the_run_and_deletes_nothing(finished_run, tmp_path, capsys):
    workdir = copy_run(finished_run, tmp_path)
    for step in (3, 6):
        flip_bytes(largest_array_file(os.path.join(workdir, "checkpoints", str(step))))
    with pytest.raises(ResumeError, match="no intact checkpoint.*Nothing was deleted"):
        trainer(workdir).run()
    assert sorted(name.split("-")[0] for name in os.listdir(workdir / "damaged_checkpoints")) == ["3", "6"]
    assert not [n for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    # The same command again (a scheduler's requeue) does not quietly start over on top of the damaged run...
    records = open(workdir / "metrics.jsonl").read()
    with pytest.raises(ResumeError, match="earlier ones of this workdir were damaged.*move .*damaged_checkpoints"):
        trainer(workdir).run()
    assert open(workdir / "metrics.jsonl").read() == records
    # ...until the damaged steps are moved away on purpose; then it says what it drops.
    shutil.move(workdir / "damaged_checkpoints", tmp_path / "kept")
    capsys.readouterr()
    assert trainer(workdir).run().step == STEPS
    assert f"Dropped {len(records.splitlines())} records of steps after 0" in capsys.readouterr().err


def test_non_finite_values_in_a_checkpoint_are_damage(finished_run, tmp_path):
    workdir = copy_run(finished_run, tmp_path)
    t = trainer(workdir)
    checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=5)
    state = t.restore(checkpointer, 6)
    nan_params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.nan), state.params)
    nan_state = state.replace(params=nan_params, step=state.step + 3)
    meta = checkpointer.read_meta(6)
    # Written with a digest of these very arrays: only the finiteness check can refuse them.
    meta = dict(meta, step=9, digest=dict(ckpt_lib.state_digest(nan_state), nonfinite=[]))
    checkpointer._manager.save(9, args=ocp.args.Composite(state=ocp.args.StandardSave(nan_state),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
    checkpointer.wait()
    resumed = t.resume(checkpointer)
    checkpointer.close()
    assert resumed["step"] == 6 and "NaN/Inf" in resumed["damaged"][0][1]


def test_saving_a_non_finite_state_is_refused(tmp_path):
    state = {"w": jax.numpy.array([1.0, np.inf])}
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
    with pytest.raises(ckpt_lib.NonFiniteStateError, match="w"):
        checkpointer.save(1, state, {})
    assert checkpointer.all_steps() == []
    checkpointer.close()


def test_digest_is_exact_for_any_change_and_any_sharding():
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(16, 8)).astype(np.float32), "b": rng.integers(0, 9, (5,)).astype(np.int32),
            "c": rng.normal(size=(4, 4)).astype(jax.numpy.bfloat16)}
    recorded = ckpt_lib.state_digest(tree)
    mesh = jax.make_mesh((8,), ("x",))
    sharded = {"a": jax.device_put(tree["a"], jax.NamedSharding(mesh, jax.P("x"))), "b": tree["b"], "c": tree["c"]}
    assert ckpt_lib.verify(sharded, recorded) == []
    swapped = dict(tree, a=tree["a"][[1, 0] + list(range(2, 16))])  # same values, two rows exchanged
    one_bit = dict(tree, b=tree["b"] ^ np.array([0, 0, 4, 0, 0], np.int32))
    for changed, name in ((swapped, "a"), (one_bit, "b")):
        (problem,) = ckpt_lib.verify(changed, recorded)
        assert problem.startswith(f"{name}: digest")
    # The digest is the two wrap-around sums of the raw bits, unweighted and weighted by the flat index.
    bits = tree["a"].view(np.uint32).ravel().astype(np.uint64)
    weights = (np.arange(bits.size, dtype=np.uint64) * 0x9E3779B1 + 1) % 2**32
    expected = f"{int(bits.sum() % 2**32):08x}{int((bits * weights % 2**32).sum() % 2**32):08x}"
    assert recorded["arrays"]["a"] == expected


def test_init_from_a_damaged_checkpoint_names_the_key(finished_run, tmp_path):
    workdir = copy_run(finished_run, tmp_path)
    values_of_step_3(os.path.join(workdir, "checkpoints", "6"))
    with pytest.raises(ValueError, match=r"config.init_from.workdir=.*damaged.*digest"):
        ckpt_lib.load_params(str(workdir), 6)
    loaded, step = ckpt_lib.load_params(str(workdir), 3)
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, finished_run[1][3]), loaded)


def test_temporary_directories_of_unfinished_saves_are_removed(finished_run, tmp_path, capsys):
    workdir = copy_run(finished_run, tmp_path)
    leftover = workdir / "checkpoints" / f"9{ocp.path.atomicity_types.TMP_DIR_SUFFIX}"
    leftover.mkdir()
    (leftover / "partial").write_text("half a save")
    capsys.readouterr()
    trainer(workdir).run()
    assert not leftover.exists()
    assert "Removing 1 unfinished save(s) of an earlier run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- config changes
@pytest.mark.parametrize("change, key", [(dict(seed=1), "seed"), (dict(batch_size=16), "batch_size"),
                                         (dict(optimizer__name="sgd"), "optimizer.name"),
                                         (dict(model__width=64, model__num_heads=2), "model.width")])
def test_resume_with_a_changed_config_is_refused_before_anything_is_rewritten(finished_run, tmp_path, change, key):
    workdir = copy_run(finished_run, tmp_path)
    before = {name: open(workdir / name).read() for name in ("config.json", "metrics.jsonl", "history.jsonl")}
    with pytest.raises(ResumeError) as info:
        trainer(workdir, **change).run()
    saved_value = json.loads(before["config.json"])
    for part in key.split("."):
        saved_value = saved_value[part]
    assert f"{key}: {saved_value!r} in the checkpoint" in str(info.value)
    assert "resume_policy=force" in str(info.value)
    assert {name: open(workdir / name).read() for name in before} == before
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


def test_force_resumes_a_changed_seed_but_never_a_changed_shape(finished_run, tmp_path):
    workdir = copy_run(finished_run, tmp_path)
    result = trainer(workdir, seed=1, total_steps=STEPS + 1, resume_policy="force").run()
    assert result.step == STEPS + 1
    (record,) = [r for r in history(workdir) if r["event"] == "resume"]
    assert record["forced"] == ["seed"] and record["changes"]["seed"] == [0, 1]
    with pytest.raises(ResumeError, match=r"params/embedding/conv/kernel: checkpoint \(4, 4, 3, 32\) float32 vs "
                                          r"model \(4, 4, 3, 64\)"):
        trainer(workdir, model__width=64, model__num_heads=2, resume_policy="force").run()


def test_safe_changes_resume_and_are_recorded_with_the_schedule_change(finished_run, tmp_path, capsys):
    workdir = copy_run(finished_run, tmp_path)
    result = trainer(workdir, total_steps=STEPS + 2, evals__eval__examples=20, log_every=2, mesh__data=1).run()
    assert result.step == STEPS + 2
    (record,) = [r for r in history(workdir) if r["event"] == "resume"]
    assert record["changes"] == {"total_steps": [STEPS, STEPS + 2], "evals.eval.examples": [40, 20], "log_every": [1, 2],
                                 "mesh.data": [-1, 1]}
    err = capsys.readouterr().err
    assert "total_steps 6 -> 8: the learning rate at step 6" in err and record["notes"]
    assert json.load(open(workdir / "config.json"))["total_steps"] == STEPS + 2


# ------------------------------------------------------------------------------------------------- the lock
def write_lock(workdir, **record):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, workdir_lib.LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": "earlier", "argv": ["other"],
                   **record}, f)
    return path


def test_a_live_holder_keeps_the_workdir(tmp_path):
    write_lock(tmp_path)  # this very process: alive
    with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"PID {os.getpid()} on host {socket.gethostname()}"):
        trainer(tmp_path).run()
    assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "metrics.jsonl")


def test_stale_locks_are_taken_over_with_a_warning(tmp_path, capsys):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)  # a PID whose process has exited
    path = write_lock(tmp_path, pid=dead)
    lock = workdir_lib.WorkdirLock(str(tmp_path), stale_seconds=60)
    assert f"process {dead} on this host is gone" in lock.acquire()
    assert json.load(open(path))["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(path)
    # Another host: stale only once it stops being refreshed.
    write_lock(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(workdir_lib.WorkdirBusyError, match="PID 1 on host elsewhere"):
        workdir_lib.WorkdirLock(str(tmp_path), stale_seconds=60).acquire()
    os.utime(path, (0, 0))
    lock = workdir_lib.WorkdirLock(str(tmp_path), stale_seconds=60)
    assert "last refreshed" in lock.acquire()
    lock.release()


def test_live_holder_names_only_a_run_that_may_be_alive(tmp_path):
    lock = workdir_lib.WorkdirLock(str(tmp_path), stale_seconds=60)
    assert lock.live_holder() is None  # no lock file
    write_lock(tmp_path)  # this very process
    assert f"PID {os.getpid()} on host {socket.gethostname()}" in lock.live_holder()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lock(tmp_path, pid=int(finished.stdout))  # its process has exited
    assert lock.live_holder() is None
    write_lock(tmp_path, host="elsewhere", pid=1)
    assert "PID 1 on host elsewhere" in lock.live_holder()
    os.utime(tmp_path / workdir_lib.LOCK_NAME, (0, 0))  # not refreshed for longer than stale_seconds
    assert lock.live_holder() is None


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    t = trainer(tmp_path)
    t.evaluate = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        t.run()
    assert not os.path.exists(tmp_path / workdir_lib.LOCK_NAME)


# ------------------------------------------------------------------------------- metrics, NaN, signals, counts
def test_metrics_of_replayed_steps_are_not_duplicated(finished_run, tmp_path):
    workdir = copy_run(finished_run, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "6")  # the run "died" after logging steps 4-6 and the final eval
    trainer(workdir).run()
    records = read_jsonl(workdir / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "eval/loss" in r] == [STEPS]
    # A finished run started again re-evaluates its last step once, not twice.
    trainer(workdir).run()
    assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "eval/loss" in r] == [STEPS]


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
    t = trainer(tmp_path, checkpoint_every=100, total_steps=5)
    honest = t.train_step
    t.train_step = lambda state, batch: (honest(state, batch)[0], {"loss": np.float32(np.inf)})
    with pytest.raises(NonFiniteLossError, match="step 1.*No checkpoint was saved or verified before it"):
        t.run()


def signal_at(t, step, signum):
    honest = t.train_step

    def step_fn(state, batch):
        state, metrics = honest(state, batch)
        if int(state.step) == step:
            os.kill(os.getpid(), signum)
        return state, metrics
    t.train_step = step_fn


def test_sigterm_at_the_last_step_still_runs_the_final_evaluation(tmp_path):
    t = trainer(tmp_path)
    signal_at(t, STEPS, signal.SIGTERM)
    result = t.run()
    assert not result.stopped_early and not result.preempted and result.stop_signal == "SIGTERM"
    assert result.eval_step == STEPS and "eval/loss" in result.eval_metrics
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/loss" in r] == [STEPS]


def test_ctrl_c_saves_a_checkpoint_and_stops_like_sigterm(tmp_path):
    # The handler the run must give back: Python's default, or SIG_IGN when pytest itself runs in the background
    # of a non-interactive shell (`make test &`).
    before = signal.getsignal(signal.SIGINT)
    t = trainer(tmp_path, checkpoint_every=100)
    signal_at(t, 2, signal.SIGINT)
    result = t.run()
    assert result.stopped_early and result.preempted and result.stop_signal == "SIGINT" and result.step == 2
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
    assert checkpointer.all_steps() == [2]
    checkpointer.close()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("overrides, message", [
    (dict(evals__eval__examples=5_001), "config.evals.eval.examples=5001 exceeds the 5000 examples of split "
                                        "'validation'"),
    (dict(evals__predictions__every=0, evals__predictions__count=5_001),
     "config.evals.predictions.count=5001 exceeds the 5000 examples"),
    (dict(data__train_examples=64, evals__probe=eval_config({"type": "probe", "train_examples": 100})),
     "config.evals.probe.train_examples=100 exceeds the 64 examples of split 'train'"),
])
def test_counts_are_checked_against_the_data_before_any_compute(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trainer(tmp_path, **overrides)
    assert not os.listdir(tmp_path)
