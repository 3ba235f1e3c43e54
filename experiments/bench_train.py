"""Train-step throughput: maskjax (JAX, jit) vs. a PyTorch timm ViT of identical shape, on the same CPU.

Command (one-time set-up, then the benchmark; about 10 minutes on 2 busy CPU cores):
  bash experiments/setup_bench.sh                       # creates/updates .venv-bench (maskjax + CPU torch + timm)
  .venv-bench/bin/python experiments/bench_train.py     # writes experiments/results/train_throughput.{md,json}

Model: ViT-Ti at the built-in data resolution: 32x32x3 images, patch 4 -> 8x8 = 64 patch tokens + 1 cls token
(65 tokens), width 192, depth 12, 3 heads (head_dim 64), MLP 768, exact GELU, pre-LN, LayerNorm eps 1e-6,
learned position embedding on the patch tokens only, cls pooling, 10 classes. float32, batch 64.
timm twin: VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
num_classes=10, no_embed_class=True) -- `no_embed_class=True` puts the position embedding on the 64 patch tokens
only, as maskjax does; parameter counts are compared and must be equal.

One train step on both sides = forward, softmax cross-entropy, backward, global-norm gradient clipping (1.0),
AdamW (b1 0.9, b2 0.999, eps 1e-8, weight decay 0.05 on matrices only), warm-up-cosine learning rate, top-1
accuracy, and reading the loss back to the host (the maskjax trainer reads its metrics every step).
Drop-path 0.1 (the maskjax default config) on both sides. Data loading is not timed: both sides reuse one batch.

Method: each framework configuration runs in its own long-lived worker process (its own thread settings and
XLA flags); after compilation and warm-up the parent asks the workers in turn, round-robin with a rotating start,
for `--steps` timed steps; each round gives one images/s figure per configuration, and the report uses the median
over `--rounds` rounds. Idle workers block on a pipe, so only one configuration computes at a time.

Ratios: maskjax / timm compares the default configurations (`maskjax`: no XLA flags; `timm`:
torch.set_num_threads(2)); best / best compares the fastest maskjax configuration with the fastest timm
configuration of the run, which is the fair number on a shared machine. Per-round ratios (the two configurations
ran back to back) are reported beside the ratio of medians.

The maskjax step is the trainer's own jitted step (`maskjax.train.trainer.Trainer(...).train_step`, donated state),
when the trainer can be built; otherwise (`--jax-step=equivalent`, or `auto` with no importable trainer) a faithful
copy of it built from the same task (`ClassificationTask.loss`) and optimizer (`make_optimizer`). The report says
which one ran.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "experiments", "results")

IMAGE_SIZE, CHANNELS, PATCH, NUM_CLASSES = 32, 3, 4, 10
WIDTH, DEPTH, HEADS, MLP_DIM = 192, 12, 3, 768
DROP_PATH = 0.1
LEARNING_RATE, WARMUP, TOTAL_STEPS = 1e-3, 30, 10_000
B1, B2, EPS, WEIGHT_DECAY, CLIP = 0.9, 0.999, 1e-8, 0.05, 1.0

# name -> (framework, settings). XLA flags go into the worker's environment before jax is imported.
CONFIGURATIONS = {
    "maskjax": ("jax", {"xla_flags": ""}),
    "maskjax+xnn-dot": ("jax", {"xla_flags": "--xla_cpu_experimental_xnn_fusion_type=dot"}),
    "maskjax+xnn-all": ("jax", {"xla_flags": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"}),
    "maskjax+xnn-graph": ("jax", {"xla_flags": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"}),
    "maskjax+ynn-dot": ("jax", {"xla_flags": "--xla_cpu_experimental_ynn_fusion_type=dot"}),
    "maskjax+onednn": ("jax", {"xla_flags": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"}),
    "maskjax+fastmath": ("jax", {"xla_flags": "--xla_cpu_enable_fast_math=true"}),
    "maskjax-1thread-eigen": ("jax", {"xla_flags": "--xla_cpu_multi_thread_eigen=false"}),
    "timm": ("torch", {"threads": 2, "fused_adamw": False, "compile": False}),
    "timm+fused": ("torch", {"threads": 2, "fused_adamw": True, "compile": False}),
    "timm+compile": ("torch", {"threads": 2, "fused_adamw": True, "compile": True}),
    "timm-1thread": ("torch", {"threads": 1, "fused_adamw": False, "compile": False}),
    "timm+passive": ("torch", {"threads": 2, "fused_adamw": False, "compile": False,
                               "env": {"OMP_WAIT_POLICY": "PASSIVE"}}),
    "timm-1thread+compile": ("torch", {"threads": 1, "fused_adamw": True, "compile": True}),
}
# maskjax as users run it; timm with torch.set_num_threads(2) (the brief's setting), and the two torch settings
# that hold up best on a 2-core machine shared with other jobs (see the report's notes).
DEFAULT_CONFIGURATIONS = "maskjax,timm,timm+passive,timm-1thread"


# ------------------------------------------------------------------------------------------------------ workers
def jax_worker(settings: dict, batch_size: int, jax_step: str) -> tuple[Callable[[], float], dict]:
    """Builds the maskjax train step; returns (one synced step -> loss, info)."""
    import jax
    import numpy as np

    from maskjax.train.config import base_config

    config = base_config()
    config.data.name = "builtin_shapes"
    config.data.image_size = IMAGE_SIZE
    config.model.variant = f"Ti/{PATCH}"
    config.model.depth = -1
    config.model.num_classes = NUM_CLASSES
    config.model.dropout = 0.0
    config.model.drop_path_rate = DROP_PATH
    config.model.dtype = "float32"
    config.batch_size = batch_size
    config.total_steps = TOTAL_STEPS
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = LEARNING_RATE
    config.optimizer.warmup_steps = WARMUP
    config.optimizer.b1, config.optimizer.b2 = B1, B2
    config.optimizer.weight_decay = WEIGHT_DECAY
    config.optimizer.grad_clip_norm = CLIP
    config.progress_bar = False

    images, labels = synthetic_batch(batch_size)
    step_source, error = None, None
    if jax_step in ("auto", "trainer"):
        try:
            step, state, batch = trainer_step(config, images, labels)
            step_source = "maskjax.train.trainer.Trainer.train_step"
        except ImportError as e:  # The trainer or its data pipeline is not importable (yet).
            if jax_step == "trainer":
                raise
            error = f"{type(e).__name__}: {e}"
    if step_source is None:
        step, state, batch = equivalent_step(config, images, labels)
        step_source = "experiments/bench_train.py:equivalent_step (copy of the trainer's step)"

    holder = {"state": state}

    def one_step() -> float:
        holder["state"], metrics = step(holder["state"], batch)
        return float(jax.device_get(metrics["loss"]))

    params = holder["state"].params
    info = {
        "step_source": step_source, "trainer_unavailable": error,
        "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
                     else None, "flax": _version("flax"), "optax": _version("optax")},
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    return one_step, info


def trainer_step(config, images, labels):
    """The real trainer's jitted step (donated state, named shardings) on one device."""
    import jax

    from maskjax.train.trainer import Trainer

    trainer = Trainer(config, tempfile.mkdtemp(prefix="bench_train_"), devices=jax.devices()[:1])
    sample = trainer.train_loader.batch_at(0)
    # Same keys and dtypes as the pipeline's batches (the step was compiled for them), our images and labels.
    local = {k: v for k, v in sample.items()}
    local["image"], local["label"] = images.astype(sample["image"].dtype), labels.astype(sample["label"].dtype)
    return trainer.train_step, trainer.initial_state(), trainer.to_global(local)


def equivalent_step(config, images, labels):
    """A copy of `Trainer._make_train_step` (accum_steps=1, one device), from the same task and optimizer."""
    import flax
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from maskjax.tasks import make_task
    from maskjax.train.optim import make_optimizer

    task = make_task(config)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    root_key = jax.random.key(config.seed)

    @flax.struct.dataclass
    class TrainState:
        step: jax.Array
        params: Any
        opt_state: Any

    def create(rng):
        params = nn.meta.unbox(task.init(rng, {"image": jnp.zeros((1,) + images.shape[1:]),
                                               "label": jnp.zeros((1,), jnp.int32)})["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def train_step(state, batch):
        step_key = jax.random.fold_in(jax.random.fold_in(root_key, 1), state.step)
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state.params, batch, step_key, True)
        metrics = dict(metrics, loss=loss)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    state = jax.jit(create)(jax.random.fold_in(root_key, 0))
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    return jax.jit(train_step, donate_argnums=0), state, batch


def torch_worker(settings: dict, batch_size: int) -> tuple[Callable[[], float], dict]:
    """Builds the timm ViT train step; returns (one step -> loss, info)."""
    import math

    import torch
    register_missing_torchvision_ops(torch)
    import timm
    from timm.models.vision_transformer import VisionTransformer

    torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    model = VisionTransformer(img_size=IMAGE_SIZE, patch_size=PATCH, in_chans=CHANNELS, num_classes=NUM_CLASSES,
                              embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP_DIM / WIDTH,
                              no_embed_class=True, drop_path_rate=DROP_PATH)
    model.train()
    # Weight decay exactly where maskjax applies it (maskjax.train.optim.decay_mask): matrices and kernels, not
    # biases, norms, position embedding or cls token.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "pos_embed" in name or "cls_token" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LEARNING_RATE, betas=(B1, B2), eps=EPS, fused=settings["fused_adamw"] or None)

    def lr_factor(step: int) -> float:  # optax.warmup_cosine_decay_schedule(0, peak, WARMUP, TOTAL_STEPS, 0) / peak
        if step < WARMUP:
            return step / WARMUP
        return 0.5 * (1 + math.cos(math.pi * min(step - WARMUP, TOTAL_STEPS - WARMUP) / (TOTAL_STEPS - WARMUP)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    forward = torch.compile(model) if settings["compile"] else model
    images, labels = synthetic_batch(batch_size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    y = torch.from_numpy(labels).long()

    def one_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = forward(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        scheduler.step()
        accuracy = (logits.argmax(-1) == y).float().mean()
        del grad_norm, accuracy
        return float(loss.item())

    info = {
        "params": int(sum(p.numel() for p in model.parameters())),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "torchvision": _version("torchvision")},
        "num_threads": torch.get_num_threads(),
        "fused_attention": bool(getattr(model.blocks[0].attn, "fused_attn", False)),
    }
    return one_step, info


def register_missing_torchvision_ops(torch) -> None:
    """Declares `torchvision::nms`/`qnms` when torchvision's compiled ops did not load (CPU torch + PyPI's CUDA-built
    torchvision), so timm imports; see maskjax/convert/_torch_compat.py."""
    from maskjax.convert._torch_compat import register_missing_torchvision_ops as register
    register(torch)


def synthetic_batch(batch_size: int):
    """Fixed images in [0, 1] [B, 32, 32, 3] float32 and labels [B] int32, identical for both frameworks."""
    import numpy as np
    rng = np.random.default_rng(0)
    images = rng.random((batch_size, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(batch_size,), dtype=np.int32)
    return images, labels


def _version(package: str):
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001  (not installed)
        return None


def worker_main(args) -> None:
    """Protocol on stdin/stdout, one JSON object per line: build, warm up, then answer {'steps': n} requests."""
    framework, settings = CONFIGURATIONS[args.worker]
    out = sys.stdout
    sys.stdout = sys.stderr  # Library chatter must not corrupt the protocol.
    start = time.perf_counter()
    if framework == "jax":
        one_step, info = jax_worker(settings, args.batch_size, args.jax_step)
    else:
        one_step, info = torch_worker(settings, args.batch_size)
    build_seconds = time.perf_counter() - start
    losses, start = [], time.perf_counter()
    first_step_seconds = None
    for i in range(args.warmup):
        losses.append(one_step())
        if i == 0:
            first_step_seconds = time.perf_counter() - start
    info.update(build_seconds=build_seconds, first_step_seconds=first_step_seconds,
                warmup_seconds=time.perf_counter() - start, warmup_losses=losses, pid=os.getpid())
    out.write(json.dumps({"ready": info}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if "steps" not in request:
            break
        times, losses = [], []
        for _ in range(int(request["steps"])):
            t0 = time.perf_counter()
            losses.append(one_step())
            times.append(time.perf_counter() - t0)
        out.write(json.dumps({"times": times, "losses": losses}) + "\n")
        out.flush()


# ------------------------------------------------------------------------------------------------------- parent
class Worker:
    def __init__(self, name: str, args):
        framework, settings = CONFIGURATIONS[name]
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        if framework == "jax":
            env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), settings["xla_flags"]) if f)
            env.setdefault("JAX_PLATFORMS", "cpu")
        env.update(settings.get("env", {}))
        command = [sys.executable, os.path.abspath(__file__), f"--worker={name}", f"--batch-size={args.batch_size}",
                   f"--warmup={args.warmup}", f"--jax-step={args.jax_step}"]
        self.name = name
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self.info = None

    def wait_ready(self) -> dict:
        reply = self._read()
        self.info = reply["ready"]
        return self.info

    def run(self, steps: int) -> dict:
        self.process.stdin.write(json.dumps({"steps": steps}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name!r} exited with code {self.process.wait()} (see stderr above)")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"stop": True}) + "\n")
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            self.process.wait(timeout=60)


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def per_round_ratios(numerator: dict, denominator: dict) -> list[float]:
    """images/s ratio per round: the two ran minutes apart at most, so slow drifts in machine load cancel."""
    return [a / b for a, b in zip(numerator["images_per_second_rounds"], denominator["images_per_second_rounds"])]


def summarize(name: str, rounds: list[dict], batch_size: int) -> dict:
    per_round = [batch_size * len(r["times"]) / sum(r["times"]) for r in rounds]
    step_times = sorted(t for r in rounds for t in r["times"])
    return {"images_per_second_median": statistics.median(per_round),
            "images_per_second_rounds": per_round,
            "images_per_second_min": min(per_round), "images_per_second_max": max(per_round),
            "step_seconds_median": statistics.median(step_times),
            "final_loss": rounds[-1]["losses"][-1]}


def write_report(result: dict, path_stem: str) -> None:
    with open(path_stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# Train-step throughput: maskjax vs. timm (CPU)",
        "",
        "Reproduce (one command each; the first creates/updates `.venv-bench`):",
        "```",
        "bash experiments/setup_bench.sh",
        f".venv-bench/bin/python {result['command']}",
        "```",
        "",
        f"Measured {result['date']} on {result['machine']['cpu']} ({result['machine']['cores']} cores, shared "
        f"with other jobs). Load average before/after: {result['load_before']} / {result['load_after']}.",
        "",
        f"**Ratio maskjax / timm (default settings of each, median images/s): {result['ratio']:.2f}x**"
        + (f" (median of per-round ratios: {result['ratio_per_round_median']:.2f}x, range "
           f"{min(result['ratio_per_round']):.2f}-{max(result['ratio_per_round']):.2f})"
           if result.get("ratio_per_round") else "")
        + (f"; best maskjax configuration / best timm configuration: {result['ratio_best']:.2f}x "
           f"({result['best']['jax']} / {result['best']['torch']}; median of per-round ratios "
           f"{result['ratio_best_per_round_median']:.2f}x, range {min(result['ratio_best_per_round']):.2f}-"
           f"{max(result['ratio_best_per_round']):.2f})." if result.get("ratio_best") else "."),
        "",
        "| configuration | framework | images/s (median) | min-max over rounds | median step (s) | parameters |"
        " build+compile (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["configurations"].items():
        lines.append(f"| {name} | {row['framework']} | {row['images_per_second_median']:.1f} | "
                     f"{row['images_per_second_min']:.1f}-{row['images_per_second_max']:.1f} | "
                     f"{row['step_seconds_median']:.3f} | {row['info']['params']:,} | "
                     f"{row['info']['build_seconds'] + (row['info']['first_step_seconds'] or 0):.1f} |")
    jax_rows = [r for r in result["configurations"].values() if r["framework"] == "jax"]
    lines += [
        "",
        f"Parameter counts equal: **{result['params_equal']}** ({result['params']}).",
        "",
        f"Settings: batch {result['batch_size']}, float32, {result['rounds']} interleaved rounds of "
        f"{result['steps']} timed steps per configuration after {result['warmup']} warm-up steps; worker order "
        "rotates each round; images/s of a round = batch x steps / time of its steps; the table shows the median "
        "over rounds.",
        "",
        "Configurations:",
    ]
    for name, row in result["configurations"].items():
        lines.append(f"- `{name}`: {json.dumps(row['settings'])}")
    for name, error in result.get("failed", {}).items():
        lines.append(f"- `{name}`: {json.dumps(CONFIGURATIONS[name][1])} -- **failed**: {error}")
    if jax_rows:
        lines += ["", f"maskjax step timed: `{jax_rows[0]['info']['step_source']}`"
                  + (f" (trainer not importable: {jax_rows[0]['info']['trainer_unavailable']})"
                     if jax_rows[0]['info'].get('trainer_unavailable') else "") + "."]
    versions = {k: v for row in result["configurations"].values() for k, v in row["info"]["versions"].items() if v}
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    lines += ["", "Model: " + __doc__.split("\nModel: ", 1)[1].split("\n\nThe maskjax step")[0]]
    if result.get("notes"):
        lines += ["", "## Notes", "", result["notes"]]
    with open(path_stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def parent_main(args) -> None:
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown:
        raise ValueError(f"--configs: unknown configuration(s) {unknown}; known: {list(CONFIGURATIONS)}")
    if args.rounds < 1 or args.steps < 1:
        raise ValueError(f"--rounds={args.rounds} and --steps={args.steps} must be >= 1")
    load_before = os.getloadavg()
    workers, failed = {}, {}
    try:
        # Build one at a time: compilation of one must not slow down the warm-up of another.
        for name in names:
            worker = Worker(name, args)
            try:
                info = worker.wait_ready()
            except RuntimeError as e:  # e.g. an XLA flag this CPU cannot run; recorded, the others go on.
                failed[name] = str(e)
                print(f"[{name}] failed: {e}", flush=True)
                worker.close()
                continue
            workers[name] = worker
            print(f"[{name}] ready: {info['params']:,} params, build {info['build_seconds']:.1f}s, first step "
                  f"{info['first_step_seconds']:.1f}s, warm-up losses {[round(l, 3) for l in info['warmup_losses']]}",
                  flush=True)
        names = [name for name in names if name in workers]
        rounds = {name: [] for name in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                reply = workers[name].run(args.steps)
                rounds[name].append(reply)
                ips = args.batch_size * len(reply["times"]) / sum(reply["times"])
                print(f"round {r + 1}/{args.rounds} {name:>16}: {ips:7.1f} images/s", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    load_after = os.getloadavg()

    configurations = {}
    for name in names:
        framework, settings = CONFIGURATIONS[name]
        configurations[name] = dict(framework=framework, settings=settings, info=workers[name].info,
                                    **summarize(name, rounds[name], args.batch_size))
    params = {name: row["info"]["params"] for name, row in configurations.items()}

    def best(framework):
        rows = {n: r for n, r in configurations.items() if r["framework"] == framework}
        return max(rows, key=lambda n: rows[n]["images_per_second_median"]) if rows else None

    best_names = {"jax": best("jax"), "torch": best("torch")}
    ratio = ratio_best = paired = paired_best = None
    if "maskjax" in configurations and "timm" in configurations:
        ratio = configurations["maskjax"]["images_per_second_median"] / configurations["timm"][
            "images_per_second_median"]
        # Rounds are adjacent in time, so a per-round ratio cancels slow drifts in the machine's load.
        paired = per_round_ratios(configurations["maskjax"], configurations["timm"])
    if best_names["jax"] and best_names["torch"]:
        ratio_best = (configurations[best_names["jax"]]["images_per_second_median"]
                      / configurations[best_names["torch"]]["images_per_second_median"])
        paired_best = per_round_ratios(configurations[best_names["jax"]], configurations[best_names["torch"]])
    command = "experiments/bench_train.py " + " ".join(a for a in sys.argv[1:]
                                                       if not a.startswith(("--notes", "--out")))
    notes = args.notes
    if args.notes_file:
        with open(args.notes_file) as f:
            notes = (notes + "\n\n" if notes else "") + f.read().strip()
    result = {
        "command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine_info(),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "batch_size": args.batch_size, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
        "model": {"image": [IMAGE_SIZE, IMAGE_SIZE, CHANNELS], "patch": PATCH, "tokens": (IMAGE_SIZE // PATCH) ** 2 + 1,
                  "width": WIDTH, "depth": DEPTH, "heads": HEADS, "mlp_dim": MLP_DIM, "classes": NUM_CLASSES,
                  "drop_path": DROP_PATH, "dtype": "float32"},
        "params": params, "params_equal": len(set(params.values())) == 1,
        "ratio": ratio if ratio is not None else ratio_best, "ratio_best": ratio_best, "best": best_names,
        "ratio_per_round": paired, "ratio_per_round_median": statistics.median(paired) if paired else None,
        "ratio_best_per_round": paired_best,
        "ratio_best_per_round_median": statistics.median(paired_best) if paired_best else None,
        "configurations": configurations, "failed": failed, "notes": notes,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_report(result, args.out)
    print(f"ratio maskjax/timm = {result['ratio']:.3f}" + (f", best/best = {ratio_best:.3f}" if ratio_best else ""))
    print(f"wrote {args.out}.md and {args.out}.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGURATIONS,
                        help=f"comma-separated configurations from {list(CONFIGURATIONS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds per configuration")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    parser.add_argument("--jax-step", choices=("auto", "trainer", "equivalent"), default="auto",
                        help="time the trainer's own step, the in-file copy, or the trainer when importable")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "train_throughput"),
                        help="output path without extension (.md and .json are written)")
    parser.add_argument("--notes", default="", help="free text appended to the report")
    parser.add_argument("--notes-file", default="", help="Markdown file appended to the report")
    parser.add_argument("--render", default="", help="only rewrite the Markdown report from this results JSON")
    parser.add_argument("--worker", choices=tuple(CONFIGURATIONS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.worker:
        worker_main(parsed)
    elif parsed.render:
        with open(parsed.render) as f:
            write_report(json.load(f), os.path.splitext(parsed.render)[0])
    else:
        parent_main(parsed)
