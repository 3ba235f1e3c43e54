"""Training-loop body before and after issue 14: steps/s of the main job's config, old loop vs new, same run.

    python experiments/bench_loop.py                       # 1 CPU device, then 8 fake CPU devices
    python experiments/bench_loop.py --devices 1 --rounds 3 --steps 10

One `Trainer` from configs/mae_builtin.py (full config: ViT-Ti/4 depth 6, MAE decoder, batch 128, built-in data;
total_steps unchanged, so the same learning-rate schedule) per device count. Two loop bodies over the same global
batches, which are read from the real loader (`train_loader.batch_at` -> `to_global`) BEFORE timing, so data
loading is not measured:
  old  after every step `jax.device_get(metrics)` and `np.isfinite(metrics["loss"])` on the host (before issue 14);
  new  `trainer._accumulate(acc, metrics, state.step)` every step (sums on device) and one `jax.device_get` of the
       accumulator every `log_every` steps (the main job's 10), as `Trainer._run_locked` does now.
Both end a round by blocking on the state, so both time completed work, and both start every round from the same
freshly created state (train_step donates it). 12 rounds of 10 steps (one log window) per variant, interleaved
(old/new order alternates), after a warm-up that compiles everything; the warm-up runs `new` under
jax.transfer_guard_device_to_host("disallow") between log steps. Each device count runs in its own process:
XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before jax is imported. Writes results/loop.{md,json}.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def child(rounds: int, steps: int) -> dict:
    """Runs in a process whose XLA_FLAGS are already set; returns the measurements of one device count."""
    import contextlib
    import importlib.util

    import jax
    import numpy as np

    from maskjax.train.trainer import Trainer, _zero_accumulator

    load_start = os.getloadavg()
    spec = importlib.util.spec_from_file_location("mae_builtin", os.path.join(ROOT, "configs", "mae_builtin.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    trainer = Trainer(config, tempfile.mkdtemp(prefix="bench_loop_"))  # nothing is written there
    log_every = config.log_every
    batches = [trainer.to_global(trainer.train_loader.batch_at(i)) for i in range(steps)]
    jax.block_until_ready(batches)

    def old(state, batches):
        losses = []
        for batch in batches:
            state, metrics = trainer.train_step(state, batch)
            metrics = jax.device_get(metrics)
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(metrics["loss"])
            losses.append(float(metrics["loss"]))
        jax.block_until_ready(state)
        return state, sum(losses[-log_every:]) / len(losses[-log_every:])

    def new(state, batches, guard=contextlib.nullcontext):
        acc, mean = None, None
        for i, batch in enumerate(batches):
            log = (i + 1) % log_every == 0 or i + 1 == len(batches)
            with contextlib.nullcontext() if log else guard():
                state, metrics = trainer.train_step(state, batch)
                if acc is None:
                    acc = _zero_accumulator(metrics)
                acc = trainer._accumulate(acc, metrics, state.step)
            if log:
                host = jax.device_get(acc)
                if int(host["nonfinite"]):
                    raise FloatingPointError(f"non-finite loss at step {int(host['first_bad'])}")
                mean, acc = float(host["sums"]["loss"]) / int(host["steps"]), None
        jax.block_until_ready(state)
        return state, mean

    def timed(body, batches, **kwargs):
        state = jax.block_until_ready(trainer.initial_state())  # same fresh state every time, outside the clock
        start = time.perf_counter()
        state, last_loss = body(state, batches, **kwargs)
        return len(batches) / (time.perf_counter() - start), last_loss, int(jax.device_get(state.step))

    # Warm-up: compiles the step, the accumulator and both fetches.
    timed(old, batches[:log_every + 1])
    timed(new, batches[:log_every + 1], guard=lambda: jax.transfer_guard_device_to_host("disallow"))
    bodies = {"old": old, "new": new}
    rates = {"old": [], "new": []}
    losses = {}
    for r in range(rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            rate, losses[name], final_step = timed(bodies[name], batches)
            assert final_step == steps, final_step
            rates[name].append(rate)
            print(f"  devices={jax.device_count()} round {r + 1}/{rounds} {name}: {rate:.3f} steps/s", file=sys.stderr,
                  flush=True)
    ratios = [n / o for n, o in zip(rates["new"], rates["old"])]
    return dict(devices=jax.device_count(), mesh=dict(trainer.mesh.shape), jax=jax.__version__,
                backend=jax.default_backend(), log_every=log_every, batch_size=config.batch_size,
                steps_per_round=steps, rounds=rounds, steps_per_s=rates, round_ratios=ratios,
                median_old=statistics.median(rates["old"]), median_new=statistics.median(rates["new"]),
                ratio_median=statistics.median(rates["new"]) / statistics.median(rates["old"]),
                ratio_rounds=statistics.median(ratios),
                ratio_best=max(rates["new"]) / max(rates["old"]),
                last_window_loss=losses, same_loss=abs(losses["old"] - losses["new"]) <= 1e-5 * abs(losses["old"]),
                load_start=load_start, load_end=os.getloadavg())


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def write(results: list, command: str) -> None:
    meta = dict(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git("rev-parse",
                "HEAD"), maskjax_uncommitted=bool(git("status", "--porcelain", "maskjax")), cpu_count=os.cpu_count())
    with open(os.path.join(RESULTS, "loop.json"), "w") as f:
        json.dump(dict(meta, results=results), f, indent=1)
    first = results[0]
    lines = ["# Training loop: per-step metric fetch (before issue 14) vs on-device sums fetched at log steps", "",
             f"Command: `{command}`", "",
             f"Date {meta['date']}, commit `{meta['commit'][:10]}`"
             + (" (maskjax/ had uncommitted changes)" if meta["maskjax_uncommitted"] else "")
             + f", jax {first['jax']} on {first['backend']} ({os.cpu_count()} cores, shared machine).", "",
             f"Config `configs/mae_builtin.py` (full, not runlocal): ViT-Ti/4 depth 6 + MAE decoder, batch "
             f"{first['batch_size']}, 32x32 built-in data, log_every {first['log_every']}. {first['rounds']} "
             f"interleaved rounds of {first['steps_per_round']} steps per variant, each from the same fresh state, "
             "over batches read from the real loader before timing (data loading is not measured). steps/s = "
             "median over rounds (best in brackets).", "",
             "| devices (mesh) | old steps/s | new steps/s | **new/old** (median of rounds) | per-round new/old "
             "| new/old (of the medians) | new/old (best vs best) | same loss | load avg start -> end |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mesh = "x".join(str(v) for v in r["mesh"].values())
        lines.append(f"| {r['devices']} ({mesh}) | {r['median_old']:.3f} ({max(r['steps_per_s']['old']):.3f}) | "
                     f"{r['median_new']:.3f} ({max(r['steps_per_s']['new']):.3f}) | **{r['ratio_rounds']:.3f}** | "
                     f"{min(r['round_ratios']):.3f}-{max(r['round_ratios']):.3f} | {r['ratio_median']:.3f} | "
                     f"{r['ratio_best']:.3f} | "
                     f"{'yes' if r['same_loss'] else 'NO'} | {r['load_start'][0]:.1f} -> {r['load_end'][0]:.1f} |")
    lines += ["", "*same loss*: the mean loss of the last log window is the same in both variants (same work).", "",
              "**Verdict.** " + verdict(results), ""]
    with open(os.path.join(RESULTS, "loop.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def verdict(results: list) -> str:
    measured = "; ".join(f"{r['devices']} device(s) {r['ratio_rounds']:.3f} (rounds {min(r['round_ratios']):.3f}-"
                         f"{max(r['round_ratios']):.3f}, new faster in {sum(x > 1 for x in r['round_ratios'])} of "
                         f"{len(r['round_ratios'])})" for r in results)
    return (f"new/old, median of the per-round ratios: {measured}. That median is the figure to read: each round "
            "runs old and new back to back, while best against best pairs two rounds that may have met different "
            "load from the other jobs on this machine. On CPU the backend runs each step nearly synchronously, so "
            "fetching a few scalars after a step costs little next to the step itself and little gain was expected "
            "here: about 1 %, seen in most rounds but of the size of the spread of the "
            "rounds on this shared machine. The new loop "
            "is for accelerators (TPU/GPU), where a per-step fetch makes the host wait for the device before it can "
            "queue the next step (and load its batch); that gain was not measured here. The 8 fake devices share "
            "the same 2 cores: they add partitioning and per-device dispatch, not parallel compute.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,8", help="comma-separated CPU device counts, one process each")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and variant (>= log_every)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.rounds, args.steps)), flush=True)
        return
    results = []
    for count in [int(d) for d in args.devices.split(",")]:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                          + f" --xla_force_host_platform_device_count={count}").strip())
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--rounds", str(args.rounds),
                              "--steps", str(args.steps)], env=env, stdout=subprocess.PIPE, text=True, check=True)
        results += [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    write(results, " ".join(["python experiments/bench_loop.py"] + sys.argv[1:]))


if __name__ == "__main__":
    main()
