"""Segmentation heads side by side on this CPU, with random weights (no training: speed, memory and NaN-safety do
not depend on what the weights learned).

    python experiments/segmentation/bench.py                      # every section (8-10 min on 2 loaded cores)
    python experiments/segmentation/bench.py --sections speed     # one or more of: speed memory empty split
    python experiments/segmentation/bench.py --quick              # fewer repeats, no 256x256 memory cases

Sections:
  speed   images/s of EoMT vs the Mask2Former-style model vs the per-pixel baseline on the same backbone (the
          built-in configs `segmentation_config(head, None, ...)` of configs/eomt_builtin.py: 64x64, ViT-Ti/8,
          depth 6; a larger variant: 128x128, ViT-S/8, depth 12, EoMT with 4 masked blocks, the Mask2Former
          decoder unchanged; and the built-in backbone with Mask2Former's own decoder size, 100 queries, 9 layers of
          width 256, against EoMT with 100 queries, as the EoMT paper compares them). Two paths, each one jitted program compiled before timing: the prediction path of
          the evaluators (`task.predict(params, {'image': x})`: for the mask models the forward, the bilinear
          resize of the mask logits to the image, semantic and panoptic inference, mask probabilities) and the
          model forward alone (`task.model.apply(..., train=False)`, EoMT without masks, mask_probs=None). The
          variants of one batch size alternate in rounds; median (and min) seconds per call.
  memory  compiled memory of the train-step-like function `jax.jit(jax.value_and_grad(lambda p, b:
          task.loss(p, b, key, True, step)[0]))` with point-sampled losses (segmentation.num_points=1024, and
          Mask2Former's 12544 where the image has more pixels) vs full-resolution masks (num_points=0), from
          `compiled.memory_analysis()`; plus the same split into the model's forward+backward alone and the
          loss's alone (gradient with respect to the model outputs) to show what dominates.
  empty   the empty-mask rule of masked attention: a plain softmax over all -inf logits (jnp and PyTorch),
          maskjax's `attention(..., mask=query_masks(m, fallback_to_all=...))` on the CPU backends, and the
          Mask2Former-style decoder with every predicted mask forced empty.
  split   where EoMT's train step (64x64, batch 32) goes: the model's forward and backward vs the loss
          (targets, Hungarian matching, point sampling) forward and backward.

Writes experiments/results/segmentation_bench.{md,json}; a run of some sections keeps the others' results from the
previous JSON (each section records its own command, date and load average). The machine is shared with a
training job: load averages are recorded; compare within one table, not across runs.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(ROOT, "experiments", "results")
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maskjax.train.config import load_config_file, validate  # noqa: E402
from maskjax.tasks import get_task  # noqa: E402

SECTIONS = ("speed", "memory", "empty", "split")
HEADS = ("eomt", "mask2former", "perpixel")
MEMORY_BATCH = 16
PAPER_BATCH = 2  # Mask2Former trains 16 images on 8 GPUs: 2 per device.
MIB = 2.0 ** 20


# ------------------------------------------------------------------------------------------------ helpers
def make_config(head: str, size: int = 64, *, large: bool = False, num_points: int | None = None,
                remat: bool = False, recipe: bool = False, paper: bool = False, scan: bool = False):
    """The built-in config of `head` (configs/eomt_builtin.py), optionally at `size`, ViT-S/8 depth 12 with 4
    masked EoMT blocks (`large`), another num_points, rematerialised backbone blocks, or (`recipe`, mask2former)
    Mask2Former's own decoder and query count: 100 queries, 9 layers of width 256 (8 heads, FFN 2048), and up to
    100 target segments per image (COCO-like; M = 5 stuff + 95 instance slots). `paper`: the recipe on a ViT-S/16
    backbone with mask features at stride 4 (Mask2Former's 1/4), for Mask2Former's crop sizes. `scan`: the backbone's
    blocks under nn.scan, each rematerialised (model.scan_layers + model.remat)."""
    module = load_config_file(os.path.join(ROOT, "configs", "eomt_builtin.py"))
    c = module.segmentation_config(head, None if size == 64 else f"size={size}", f"configs/{head}_builtin.py")
    if large:
        c.model.variant = "S/8"
        c.model.depth = 12
        if head == "eomt":
            c.model.num_mask_blocks = 4
    if recipe:
        c.model.update(num_queries=100, decoder_layers=9, decoder_dim=256, decoder_heads=8, decoder_mlp_dim=2048)
        c.segmentation.max_instances = 95
    if paper:
        c.model.variant = "S/16"
        c.model.mask_scale = 4.0  # stride 16 / 4: Mask2Former's 1/4-resolution mask features
    if scan:
        c.model.scan_layers = True
    if num_points is not None:
        c.segmentation.num_points = num_points
    c.model.remat = remat or scan
    validate(c, 1)
    return c


def describe(config) -> str:
    m = config.model
    text = f"{config.data.image_size}x{config.data.image_size}, ViT-{m.variant} depth {m.depth}"
    if m.name == "eomt":
        text += f", {m.num_queries} queries in the last {m.num_mask_blocks} blocks"
    if m.name == "mask2former":
        text += (f", decoder dim {m.decoder_dim}, {m.decoder_heads} heads, MLP {m.decoder_mlp_dim}, "
                 f"{m.decoder_layers} layers, {m.num_queries} queries, pyramid {tuple(m.pyramid_scales)}")
    return text


def real_batch(size: int, batch: int) -> dict:
    """`batch` examples of the built-in shapes (train split) at `size`, image in [0, 1]."""
    from maskjax.data.builtin import BuiltinShapes

    source = BuiltinShapes("train", image_size=size)
    examples = [source[i] for i in range(batch)]
    return {"image": jnp.asarray(np.stack([e["image"] for e in examples]), jnp.float32) / 255.0,
            "semantic": jnp.asarray(np.stack([e["semantic"] for e in examples]), jnp.int32),
            "instance": jnp.asarray(np.stack([e["instance"] for e in examples]), jnp.int32)}


def shape_batch(size: int, batch: int) -> dict:
    return {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
            "semantic": jax.ShapeDtypeStruct((batch, size, size), jnp.int32),
            "instance": jax.ShapeDtypeStruct((batch, size, size), jnp.int32)}


def param_shapes(task, size: int):
    one = {k: jnp.zeros(v.shape[1:], v.dtype)[None] for k, v in shape_batch(size, 1).items()}
    return nn.unbox(jax.eval_shape(lambda: task.init(jax.random.key(0), one))["params"])


def init_params(task, size: int):
    one = {k: jnp.zeros(v.shape[1:], v.dtype)[None] for k, v in shape_batch(size, 1).items()}
    return jax.jit(lambda key: nn.unbox(task.init(key, one)["params"]))(jax.random.key(0))


def flops_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float((analysis or {}).get("flops", float("nan")))


def memory_of(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "alias": m.alias_size_in_bytes}
    out["peak"] = out["temp"] + out["arguments"] + out["outputs"] - out["alias"]
    return out


def compile_all(lowered: dict, workers: int = 2) -> dict:
    """name -> lowered: compile in `workers` threads (XLA compiles outside the GIL); name -> (compiled, seconds)."""
    def one(item):
        start = time.perf_counter()
        return item[0], (item[1].compile(), time.perf_counter() - start)
    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, lowered.items()))


def time_rounds(variants: dict, repeats: int) -> dict:
    """name -> (fn, args): warm up each, then `repeats` rounds calling every variant once; median/min seconds."""
    for fn, args in variants.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (fn, args) in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(t), "min": min(t), "all": t} for name, t in times.items()}


def loss_only_task(config):
    """A task whose model is the identity on its 'params' argument: `task.loss(outputs, batch, ...)` runs the
    loss (crop, targets, matching, point sampling, deep supervision) on given model outputs."""
    task = get_task(config.task)(config)
    task._apply = lambda outputs, *args, **kwargs: outputs
    return task


def _commit() -> str:
    """HEAD's short hash, marked when maskjax/ has uncommitted changes."""
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "maskjax"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip())
    return commit + (" (with uncommitted changes under maskjax/)" if dirty else "")


def meta(command: str, load_before, load_after, seconds: float) -> dict:
    return {"command": command, "date": str(datetime.date.today()), "commit": _commit(),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
            "seconds": round(seconds, 1)}


# ------------------------------------------------------------------------------------------------- speed
def bench_speed(repeats: int, large_batches: tuple, small_batches: tuple) -> dict:
    rows, configs = [], {}
    settings = (("small", False, False, small_batches), ("large", True, False, large_batches),
                ("small-m2f-decoder", False, True, small_batches))
    for label, large, paper_decoder, batches in settings:
        size = 128 if large else 64
        tasks, params = {}, {}
        for head in HEADS:
            # paper_decoder: Mask2Former's own decoder size and query count (100 queries, 9 layers of width 256), and
            # EoMT with as many queries, as the EoMT paper compares them; the backbone and the data stay the same.
            config = make_config(head, size, large=large, recipe=paper_decoder and head == "mask2former")
            if paper_decoder and head == "eomt":
                config.model.num_queries = 100
            configs[f"{label}/{head}"] = describe(config)
            tasks[head] = get_task(config.task)(config)
            params[head] = init_params(tasks[head], size)
        for batch in batches:
            images = real_batch(size, batch)["image"]
            lowered = {}
            for head in HEADS:
                task = tasks[head]
                lowered[(head, "predict")] = jax.jit(lambda p, x, t=task: t.predict(p, {"image": x})).lower(
                    params[head], images)
                lowered[(head, "forward")] = jax.jit(
                    lambda p, x, t=task: t.model.apply({"params": p}, x, train=False)[0]).lower(params[head], images)
            compiled = compile_all(lowered)
            variants = {key: (compiled[key][0], (params[key[0]], images)) for key in lowered}
            timing = time_rounds(variants, repeats)
            for (head, path), t in timing.items():
                rows.append({"setting": label, "image_size": size, "batch": batch, "head": head, "path": path,
                             "median_s": t["median"], "min_s": t["min"], "images_per_s": batch / t["median"],
                             "images_per_s_best": batch / t["min"], "gflop": flops_of(compiled[(head, path)][0]) / 1e9,
                             "compile_s": compiled[(head, path)][1]})
            print(json.dumps({f"{h}/{p}": round(t['median'], 4) for (h, p), t in timing.items()}), flush=True)
    ratios = []
    for label, *_ in settings:
        for batch in sorted({r["batch"] for r in rows if r["setting"] == label}):
            for path in ("predict", "forward"):
                get = {r["head"]: r for r in rows if (r["setting"], r["batch"], r["path"]) == (label, batch, path)}
                ratios.append({"setting": label, "batch": batch, "path": path,
                               "eomt_over_m2f": get["eomt"]["images_per_s"] / get["mask2former"]["images_per_s"],
                               "eomt_over_m2f_best": get["eomt"]["images_per_s_best"]
                               / get["mask2former"]["images_per_s_best"],
                               "perpixel_over_eomt": get["perpixel"]["images_per_s"] / get["eomt"]["images_per_s"],
                               "flop_m2f_over_eomt": get["mask2former"]["gflop"] / get["eomt"]["gflop"]})
    return {"rows": rows, "ratios": ratios, "configs": configs, "repeats": repeats}


# ------------------------------------------------------------------------------------------------ memory
def _model_scalar(task):
    """(params, images) -> the sum of every model output (train=True, step 0): a scalar whose gradient runs the
    model's whole backward pass, without the loss."""
    key, step = jax.random.key(1), jnp.zeros((), jnp.int32)
    return lambda p, x: sum(jnp.sum(leaf) for leaf in jax.tree.leaves(task._apply(p, x, True, key, step)))


def _step_fn(task):
    key, step = jax.random.key(1), jnp.zeros((), jnp.int32)
    return jax.jit(jax.value_and_grad(lambda p, b: task.loss(p, b, key, True, step)[0]))


def bench_memory(sizes: tuple, m2f_sizes: tuple, split_sizes: tuple, remat: bool,
                 recipe_sizes: tuple = (), paper_sizes: tuple = ()) -> dict:
    """Lower every case (main thread), compile two at a time, read memory_analysis."""
    batch = MEMORY_BATCH
    lowered, cases = {}, {}
    for size in paper_sizes:  # Mask2Former's crops and per-GPU batch, the backbone with and without scan + remat.
        for scan in (True, False):
            head = "mask2former-paper" + ("-scan" if scan else "")
            for pts in (12544, 0):
                config = make_config("mask2former", size, num_points=pts, recipe=True, paper=True, scan=scan)
                task = get_task(config.task)(config)
                name = f"step/{head}/{size}/{pts}"
                lowered[name] = _step_fn(task).lower(param_shapes(task, size), shape_batch(size, PAPER_BATCH))
                cases[name] = {"kind": "step", "head": head, "size": size, "num_points": pts, "remat": scan,
                               "batch": PAPER_BATCH, "config": describe(config) + ", 100 target slots" +
                               (", model.scan_layers + model.remat" if scan else "")}
    for size in recipe_sizes:  # Mask2Former's regime: many queries, slots and supervised layers.
        for pts in (12544 if 12544 < size * size else 1024, 0):
            config = make_config("mask2former", size, num_points=pts, recipe=True)
            task = get_task(config.task)(config)
            name = f"step/mask2former-recipe/{size}/{pts}"
            lowered[name] = _step_fn(task).lower(param_shapes(task, size), shape_batch(size, batch))
            cases[name] = {"kind": "step", "head": "mask2former-recipe", "size": size, "num_points": pts,
                           "remat": False, "config": describe(config) + ", 100 target slots"}
    for size in sizes:
        points = [1024] + ([12544] if 12544 < size * size else []) + [0]
        for head in ("eomt", "mask2former"):
            if head == "mask2former" and size not in m2f_sizes:
                continue
            for pts in points:
                config = make_config(head, size, num_points=pts)
                task = get_task(config.task)(config)
                name = f"step/{head}/{size}/{pts}"
                lowered[name] = _step_fn(task).lower(param_shapes(task, size), shape_batch(size, batch))
                cases[name] = {"kind": "step", "head": head, "size": size, "num_points": pts, "remat": False,
                               "config": describe(config)}
            if head == "eomt" and size in split_sizes:
                # The same step split: the model's forward+backward alone, the loss's alone (grad wrt outputs).
                config = make_config(head, size)
                task = get_task(config.task)(config)
                key, step = jax.random.key(1), jnp.zeros((), jnp.int32)
                params = param_shapes(task, size)
                images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
                name = f"model/{head}/{size}"
                lowered[name] = jax.jit(jax.value_and_grad(_model_scalar(task))).lower(params, images)
                cases[name] = {"kind": "model", "head": head, "size": size, "num_points": None, "remat": False,
                               "config": describe(config)}
                if remat:  # the same with every ViT block rematerialised (config.model.remat=True)
                    remat_task = get_task(config.task)(make_config(head, size, remat=True))
                    name = f"model-remat/{head}/{size}"
                    lowered[name] = jax.jit(jax.value_and_grad(_model_scalar(remat_task))).lower(params, images)
                    cases[name] = {"kind": "model", "head": head, "size": size, "num_points": None, "remat": True,
                                   "config": describe(config) + ", model.remat=True"}
                outputs = jax.eval_shape(lambda p, x, task=task: task._apply(p, x, True, key, step), params, images)
                for pts in points:
                    loss_task = loss_only_task(make_config(head, size, num_points=pts))
                    name = f"loss/{head}/{size}/{pts}"
                    lowered[name] = _step_fn(loss_task).lower(outputs, shape_batch(size, batch))
                    cases[name] = {"kind": "loss", "head": head, "size": size, "num_points": pts, "remat": False,
                                   "config": describe(config)}
    print(f"memory: compiling {len(lowered)} programs", flush=True)
    compiled = compile_all(lowered)
    rows = []
    for name, case in cases.items():
        rows.append({"name": name, "batch": batch, **case, **memory_of(compiled[name][0]),
                     "compile_s": compiled[name][1]})
        print(name, {k: round(v / MIB, 1) for k, v in memory_of(compiled[name][0]).items()}, flush=True)
    by_name = {r["name"]: r for r in rows}
    ratios = []
    for r in rows:
        if r["kind"] in ("step", "loss") and r["num_points"]:
            full = by_name[f"{r['kind']}/{r['head']}/{r['size']}/0"]
            ratios.append({"kind": r["kind"], "head": r["head"], "size": r["size"], "num_points": r["num_points"],
                           "peak_ratio": r["peak"] / full["peak"], "temp_ratio": r["temp"] / full["temp"],
                           "goal_met": r["peak"] <= 0.5 * full["peak"]})
    return {"batch": batch, "rows": rows, "ratios": ratios, "arrays": _array_sizes(sizes, batch)}


def _array_sizes(sizes: tuple, batch: int) -> list:
    """Sizes (MiB, float32) of single arrays, from the built-in shapes: the model's attention scores of one block
    (3 heads, T tokens) and one stride-4 feature map of EoMT's upscaler (width 192); the loss's, with M = 9 slots
    (5 stuff + 4 instances), Q = 16 queries, mask logits at stride 4, per prediction (EoMT: 3 with deep
    supervision, Mask2Former: 7)."""
    slots, queries, out = 9, 16, []
    for size in sizes:
        pixels = size * size
        mask = (size // 4) ** 2
        tokens = (size // 8) ** 2 + 1  # ViT-Ti/8 patches + class token (+ 16 queries in EoMT's masked blocks)
        row = {"size": size, "model_attention_scores_B3TT": batch * 3 * tokens * tokens * 4 / MIB,
               "model_eomt_stride4_features_BhwD": batch * mask * 192 * 4 / MIB,
               "onehot_targets_BMHW": batch * slots * pixels * 4 / MIB,
               "mask_logits_BQhw": batch * queries * mask * 4 / MIB,
               "full_matching_pred_BQHW": batch * queries * pixels * 4 / MIB,
               "full_loss_pred_BMHW": batch * slots * pixels * 4 / MIB}
        for pts in (1024, 12544):
            if pts < pixels:
                row[f"p{pts}_matching_BQP"] = batch * queries * pts * 4 / MIB
                row[f"p{pts}_candidates_BM3P2"] = batch * slots * 3 * pts * 2 * 4 / MIB
                row[f"p{pts}_candidate_logits_BM3P"] = batch * slots * 3 * pts * 4 / MIB
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------- empty
def bench_empty() -> dict:
    from maskjax.attention import attention, query_masks
    from maskjax.models.attention_options import AttentionOptions
    from maskjax.models.segmentation import MaskedAttentionDecoder

    rows = []
    batch, queries, keys, heads, dim = 2, 16, 256, 4, 32
    kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (batch, queries, heads, dim))
    k = jax.random.normal(kk, (batch, keys, heads, dim))
    v = jax.random.normal(kv, (batch, keys, heads, dim))
    allowed = jax.random.uniform(km, (batch, queries, keys)) < 0.3
    empty_rows = np.zeros(queries, bool)
    empty_rows[::4] = True  # queries 0, 4, 8, 12 have empty predicted masks
    allowed = allowed & ~jnp.asarray(empty_rows)[None, :, None]
    nonempty = ~empty_rows

    def finite(x) -> bool:
        return bool(np.all(np.isfinite(np.asarray(x))))

    # (a) a plain softmax over a row of -inf logits.
    row = jnp.full((8,), -jnp.inf)
    rows.append({"part": "a", "implementation": "jax.nn.softmax(row of -inf)", "rule": "-",
                 "output_finite": finite(jax.nn.softmax(row)), "grad_finite": None,
                 "empty_rows": f"{np.asarray(jax.nn.softmax(row))[:2].tolist()}..."})

    def naive(q, k, v):  # PyTorch-style: logits masked with -inf, jax.nn.softmax, weights @ v
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim)
        logits = jnp.where(allowed[:, None], logits, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)

    out = naive(q, k, v)
    grads = jax.grad(lambda *a: jnp.sum(naive(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    rows.append({"part": "a", "implementation": "jnp masked softmax attention (where(mask, logits, -inf), "
                 "jax.nn.softmax, @ v)", "rule": "-", "output_finite": finite(out),
                 "grad_finite": all(finite(g) for g in grads),
                 "empty_rows": "NaN" if not finite(out[:, empty_rows]) else
                 f"max |out| {float(jnp.abs(out[:, empty_rows]).max()):.3g}",
                 "nonempty_rows_finite": finite(out[:, nonempty])})
    xla = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="xla")
    mean_v = jnp.mean(v, axis=1, keepdims=True)
    rows.append({"part": "a", "implementation": "jax.nn.dot_product_attention(mask=..., implementation='xla')",
                 "rule": "-", "output_finite": finite(xla), "grad_finite": None,
                 "empty_rows": f"mean(V) over all keys (max |out - mean V| "
                 f"{float(jnp.abs(xla[:, empty_rows] - mean_v).max()):.2g})"})
    rows += _torch_rows(np.asarray(q), np.asarray(k), np.asarray(v), np.asarray(allowed), empty_rows, dim)

    # (b) maskjax's attention with query masks on the CPU backends.
    unmasked = attention(q, k, v, backend="reference")
    reference = {}
    for backend in ("reference", "blocked", "pallas"):
        for fallback in (True, False):
            rule = "fallback_to_all=True (attend all)" if fallback else "fallback_to_all=False (attend none)"
            kwargs = {} if backend == "reference" else {"block_q": 8, "block_k": 64}
            if backend == "pallas":
                kwargs["interpret"] = True

            def fn(q, k, v, fallback=fallback, backend=backend, kwargs=kwargs):
                return attention(q, k, v, mask=query_masks(allowed, fallback_to_all=fallback), backend=backend,
                                 **kwargs)
            try:
                out = jax.jit(fn)(q, k, v)
                grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2)))(q, k, v)
            except Exception as e:  # noqa: BLE001 - recorded, not hidden
                rows.append({"part": "b", "implementation": f"maskjax attention, backend={backend!r}", "rule": rule,
                             "output_finite": None, "grad_finite": None,
                             "empty_rows": f"unsupported: {type(e).__name__}: {str(e)[:120]}"})
                continue
            reference.setdefault(fallback, out)
            if fallback:
                empty = f"= unmasked attention (max diff {float(jnp.abs(out - unmasked)[:, empty_rows].max()):.1e})"
            else:
                empty = (f"zeros (max |out| {float(jnp.abs(out[:, empty_rows]).max()):.1e}, "
                         f"max |dq| {float(jnp.abs(grads[0][:, empty_rows]).max()):.1e})")
            rows.append({"part": "b", "implementation": f"maskjax attention, backend={backend!r}", "rule": rule,
                         "output_finite": finite(out), "grad_finite": all(finite(g) for g in grads),
                         "empty_rows": empty,
                         "max_diff_vs_reference": float(jnp.abs(out - reference[fallback]).max())})

    # (c) the Mask2Former-style decoder with every predicted mask empty.
    levels_hw, dim_dec = (4, 8, 16), 128
    keys_ = jax.random.split(jax.random.key(3), len(levels_hw) + 1)
    # Positive features and a mask MLP whose last layer outputs the constant vector -1: every mask logit is
    # -sum(features) < 0, so every query's predicted mask is empty before every layer.
    levels = [jax.random.uniform(keys_[i], (batch, s, s, dim_dec), minval=0.1, maxval=1.0)
              for i, s in enumerate(levels_hw)]
    mask_features = jax.random.uniform(keys_[-1], (batch, 16, 16, dim_dec), minval=0.1, maxval=1.0)
    decoder_layers = 3  # one per level; fewer compile minutes than the built-in 6 on this loaded machine
    init_decoder = MaskedAttentionDecoder(15, num_queries=16, num_heads=4, mlp_dim=512, num_layers=decoder_layers)
    params = jax.jit(lambda key: nn.unbox(init_decoder.init(key, levels, mask_features)["params"]))(
        jax.random.key(4))
    mlp = dict(params["mask_head"]["mask_mlp_2"])
    mlp["kernel"] = jnp.zeros_like(mlp["kernel"])
    mlp["bias"] = jnp.full_like(mlp["bias"], -1.0)
    params = {**params, "mask_head": {**params["mask_head"], "mask_mlp_2": mlp}}
    for backend in ("auto", "blocked"):  # 'auto' is what the built-in configs run (dense on CPU at this size)
        for rule in ("attend_all", "attend_none"):
            decoder = init_decoder.clone(empty_mask_rule=rule, attention=AttentionOptions(backend=backend))

            def scalar(p, levels, feats, decoder=decoder):
                cls, masks, layers = decoder.apply({"params": p}, levels, feats)
                return jnp.sum(cls) + jnp.sum(jnp.sin(masks)), (cls, masks, layers)

            (_, (cls, masks, layers)), grads = jax.jit(jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True))(
                params, levels, mask_features)
            all_masks = [masks] + [layer["mask_logits"] for layer in layers]
            nonempty_masks = int(sum(jnp.sum(jnp.any(m >= 0, axis=(-1, -2))) for m in all_masks))
            cross_grad = float(jnp.abs(grads[0]["layer_0"]["cross_attn"]["query"]["kernel"]).max())
            rows.append({"part": "c", "implementation": f"MaskedAttentionDecoder ({decoder_layers} layers), "
                         f"backend={backend!r}", "rule": rule, "output_finite": finite(cls) and finite(masks),
                         "grad_finite": all(finite(g) for g in jax.tree.leaves(grads)),
                         "empty_rows": f"{nonempty_masks} non-empty predicted masks in {len(all_masks)} "
                         f"predictions; max |d loss / d cross_attn query kernel (layer 0)| {cross_grad:.2g}"})
    return {"rows": rows, "shapes": {"batch": batch, "queries": queries, "keys": keys, "heads": heads,
                                     "head_dim": dim, "empty_queries": np.flatnonzero(empty_rows).tolist()}}


def _torch_rows(q, k, v, allowed, empty_rows, dim) -> list:
    rows = []
    try:
        from maskjax.convert._torch_compat import import_torch
        torch = import_torch()
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001
        return [{"part": "a", "implementation": "PyTorch", "rule": "-", "output_finite": None, "grad_finite": None,
                 "empty_rows": f"torch not importable: {e}"}]
    version = torch.__version__

    def finite(x) -> bool:
        return bool(torch.isfinite(x).all())

    def tensors():
        qt, kt, vt = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
        return qt, kt, vt  # [B, heads, L, D]

    def summarize(name, out, qt, kt, vt, rows_axis=2):
        out.pow(2).sum().backward()
        grads = [t.grad for t in (qt, kt, vt)]
        er = out.detach().index_select(rows_axis, torch.tensor(np.flatnonzero(empty_rows)))
        empty = "NaN" if not finite(er) else f"max |out| {float(er.abs().max()):.3g}"
        rows.append({"part": "a", "implementation": f"torch {version}: {name}", "rule": "-",
                     "output_finite": finite(out.detach()), "grad_finite": all(finite(g) for g in grads),
                     "empty_rows": empty})

    row = torch.full((8,), float("-inf"))
    rows.append({"part": "a", "implementation": f"torch {version}: torch.softmax(row of -inf)", "rule": "-",
                 "output_finite": finite(torch.softmax(row, -1)), "grad_finite": None,
                 "empty_rows": str(torch.softmax(row, -1)[:2].tolist()) + "..."})
    keep = torch.tensor(allowed)[:, None]  # [B, 1, Q, K], True = attend (SDPA's bool convention)
    qt, kt, vt = tensors()
    summarize("F.scaled_dot_product_attention(attn_mask=bool, row all False), default CPU kernel",
              F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep), qt, kt, vt)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qt, kt, vt = tensors()
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep)
        summarize("F.scaled_dot_product_attention, SDPBackend.MATH", out, qt, kt, vt)
    except Exception as e:  # noqa: BLE001
        rows.append({"part": "a", "implementation": "torch SDPA math backend", "rule": "-", "output_finite": None,
                     "grad_finite": None, "empty_rows": f"not run: {e}"})
    qt, kt, vt = tensors()
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    summarize("F.scaled_dot_product_attention(attn_mask=float with -inf), default CPU kernel",
              F.scaled_dot_product_attention(qt, kt, vt, attn_mask=additive), qt, kt, vt)
    # nn.MultiheadAttention: attn_mask True = NOT allowed; a query with an empty mask has a full-True row.
    torch.manual_seed(0)
    heads = q.shape[2]
    mha = torch.nn.MultiheadAttention(heads * dim, heads, batch_first=True)
    blocked = torch.tensor(~allowed).repeat_interleave(heads, dim=0)  # [B * heads, Q, K]
    xq, xk, xv = (torch.tensor(x.reshape(x.shape[0], x.shape[1], -1)).requires_grad_(True) for x in (q, k, v))
    out, _ = mha(xq, xk, xv, attn_mask=blocked)
    summarize("nn.MultiheadAttention(attn_mask row all True), training mode", out, xq, xk, xv, rows_axis=1)
    mha.eval()
    with torch.no_grad():
        out, _ = mha(*(torch.tensor(x.reshape(x.shape[0], x.shape[1], -1)) for x in (q, k, v)), attn_mask=blocked,
                     need_weights=False)
    er = out[:, torch.tensor(np.flatnonzero(empty_rows))]
    rows.append({"part": "a", "implementation": f"torch {version}: nn.MultiheadAttention, eval + no_grad "
                 "(fast path, need_weights=False)", "rule": "-", "output_finite": finite(out), "grad_finite": None,
                 "empty_rows": "NaN" if not finite(er) else f"out_proj bias only (max |out - bias| "
                 f"{float((er - mha.out_proj.bias.detach()).abs().max()):.2g})"})
    return rows


# ------------------------------------------------------------------------------------------------- split
def bench_split(repeats: int, batch: int = 32, size: int = 64) -> dict:
    from maskjax.tasks import hungarian
    from maskjax.tasks.segmentation import point_sample

    config = make_config("eomt", size)
    task = get_task(config.task)(config)
    full_task = loss_only_task(make_config("eomt", size, num_points=0))
    loss_task = loss_only_task(config)
    data = real_batch(size, batch)
    params = init_params(task, size)
    key, step = jax.random.key(1), jnp.zeros((), jnp.int32)
    outputs = jax.jit(lambda p, x: task._apply(p, x, True, key, step))(params, data["image"])

    model_scalar = _model_scalar(task)

    num_predictions = 1 + len(outputs["layers"])
    slots = task.num_slots
    costs = jax.random.uniform(jax.random.key(2), (num_predictions, batch, config.model.num_queries, slots))
    valid = jax.random.uniform(jax.random.key(3), (batch, slots)) < 0.6

    def matching(c, valid):
        return [jax.vmap(hungarian.match_padded)(c[i], valid).query_for_target for i in range(c.shape[0])]

    # The importance-sampling pieces of set_loss_sums, at its shapes (per prediction, vmapped over the batch).
    points = config.segmentation.num_points
    candidates = int(points * config.segmentation.oversample_ratio)
    important = int(points * config.segmentation.importance_sample_ratio)
    example_keys = jax.random.split(jax.random.key(4), batch)
    matched_logits = outputs["mask_logits"][:, :slots]  # [B, M, h, w], as pred = mask_logits[matched]

    def draw(keys):
        def one(key):
            k_over, k_rand = jax.random.split(key)
            return (jax.random.uniform(k_over, (slots, candidates, 2)),
                    jax.random.uniform(k_rand, (slots, points - important, 2)))
        return [jax.vmap(one)(jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys))
                for i in range(num_predictions)]

    cand_logits = jax.random.normal(jax.random.key(5), (num_predictions, batch, slots, candidates))

    def select(x):
        return [jax.lax.top_k(-jnp.abs(x[i]), important)[1] for i in range(num_predictions)]

    chosen = jax.random.uniform(jax.random.key(6), (batch, slots, points, 2))

    def sample_loss(pred, chosen):
        sample = jax.vmap(jax.vmap(lambda m, p: point_sample(m[None], p)[0]))
        return sum(jnp.sum(jax.nn.softplus(sample(pred, chosen))) for _ in range(num_predictions))

    fns = {
        "train step: value_and_grad(task.loss)": (_step_fn(task), (params, data)),
        "model forward + backward (train=True, masked blocks)": (jax.jit(jax.value_and_grad(model_scalar)),
                                                                 (params, data["image"])),
        "model forward only": (jax.jit(lambda p, x: task._apply(p, x, True, key, step)), (params, data["image"])),
        f"loss forward + backward, num_points={config.segmentation.num_points}": (_step_fn(loss_task),
                                                                                  (outputs, data)),
        "loss forward + backward, num_points=0 (full masks)": (_step_fn(full_task), (outputs, data)),
        f"Hungarian matching alone ({num_predictions} x vmap over the batch)": (jax.jit(matching), (costs, valid)),
        f"point loss piece: random candidates + extra points ({num_predictions} x [B, M, {candidates}, 2] + "
        f"[B, M, {points - important}, 2])": (jax.jit(draw), (example_keys,)),
        f"point loss piece: top_k({important}) of |logit| over {candidates} candidates ({num_predictions} x "
        "[B, M])": (jax.jit(select), (cand_logits,)),
        f"point loss piece: bilinear point_sample of [B, M, h, w] logits at {points} points, fwd + bwd "
        f"({num_predictions} x)": (jax.jit(jax.value_and_grad(sample_loss)), (matched_logits, chosen)),
    }
    lowered = {name: fn.lower(*args) for name, (fn, args) in fns.items()}
    compiled = compile_all(lowered)
    timing = time_rounds({name: (compiled[name][0], fns[name][1]) for name in fns}, repeats)
    step_s = timing["train step: value_and_grad(task.loss)"]["median"]
    rows = [{"part": name, "median_s": t["median"], "min_s": t["min"], "share_of_step": t["median"] / step_s,
             "gflop": flops_of(compiled[name][0]) / 1e9} for name, t in timing.items()]
    print(json.dumps({r["part"]: round(r["median_s"], 4) for r in rows}), flush=True)
    return {"batch": batch, "size": size, "config": describe(config), "num_predictions": num_predictions,
            "repeats": repeats, "rows": rows}


# ------------------------------------------------------------------------------------------------ report
def _yes(x) -> str:
    return "-" if x is None else ("yes" if x else "**no**")


def write(results: dict) -> None:
    lines = ["# Segmentation heads: inference speed, training memory, the empty-mask rule, train-step split", "",
             f"Written by `experiments/segmentation/bench.py`; each section names its command, date and maskjax "
             f"commit; jax {jax.__version__} (backend {jax.default_backend()}), Python {platform.python_version()}, "
             f"{os.cpu_count()} CPU cores. "
             "**Random weights throughout** (nothing trained): speed, memory and finiteness do not depend on what "
             "the weights learned. The machine is shared with a training job (load averages per section below): "
             "absolute times are pessimistic and noisy; compare within a table.", ""]
    speed, memory, empty, split = (results.get(s) for s in SECTIONS)
    if speed:
        m = speed["meta"]
        lines += ["## 1. Inference speed: EoMT vs Mask2Former-style vs per-pixel, same backbone", "",
                  f"`{m['command']}` — {m['date']}, commit {m.get('commit', '?')}, load average (1, 5, 15 min) {tuple(m['load_before'])} before, "
                  f"{tuple(m['load_after'])} after, {m['seconds']:.0f} s.", "", "Configs:"]
        lines += [f"- {name}: {text}" for name, text in speed["configs"].items()]
        lines += ["", "The larger setting scales the backbone only: the Mask2Former-style decoder stays the built-in one "
                  "(dim 128, 6 layers, light FPN pixel decoder, no deformable attention), so the decoder is a smaller "
                  "share of the compute than in the EoMT paper's comparison (Mask2Former's dim-256, 9-layer decoder "
                  "and multi-scale deformable pixel decoder on ViT-L); the ratio below is this codebase's, not the "
                  "paper's setting. The small-m2f-decoder setting keeps the built-in backbone and data but gives the "
                  "Mask2Former-style model Mask2Former's own decoder size (100 queries, 9 layers of width 256, "
                  "8 heads, MLP 2048; still the light pixel decoder) and EoMT as many queries (100), the query count "
                  "and decoder of the EoMT paper's comparison; these models are not trained here."]
        lines += ["", "Paths: `predict` = `jax.jit(lambda p, x: task.predict(p, {'image': x}))`, what the evaluators "
                  "run (mask models: forward, bilinear resize of the mask logits to the image, semantic + panoptic "
                  "inference, sigmoid mask probabilities; per-pixel: forward, bilinear upsampling, argmax); "
                  "`forward` = `jax.jit(lambda p, x: task.model.apply({'params': p}, x, train=False)[0])` (EoMT "
                  "without masks: mask_probs=None). float32, real built-in images. Per batch size the 6 programs "
                  f"alternate over {speed['repeats']} rounds; images/s from the median (best from the min) call.",
                  "", "| setting | batch | head | path | median ms | images/s | images/s (best) | GFLOP/call |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in speed["rows"]:
            lines.append(f"| {r['setting']} {r['image_size']}px | {r['batch']} | {r['head']} | {r['path']} | "
                         f"{r['median_s'] * 1e3:.1f} | {r['images_per_s']:.1f} | {r['images_per_s_best']:.1f} | "
                         f"{r['gflop']:.2f} |")
        lines += ["", "Ratios (images/s; > 1 means EoMT is faster):", "",
                  "| setting | batch | path | EoMT / M2F (median) | EoMT / M2F (best) | per-pixel / EoMT | "
                  "M2F / EoMT FLOPs |", "|---|---|---|---|---|---|---|"]
        for r in speed["ratios"]:
            lines.append(f"| {r['setting']} | {r['batch']} | {r['path']} | {r['eomt_over_m2f']:.2f}x | "
                         f"{r['eomt_over_m2f_best']:.2f}x | {r['perpixel_over_eomt']:.2f}x | "
                         f"{r['flop_m2f_over_eomt']:.2f}x |")
        lines.append("")
    if memory:
        m = memory["meta"]
        lines += ["## 2. Training memory: point-sampled loss vs full-mask loss", "",
                  f"`{m['command']}` — {m['date']}, commit {m.get('commit', '?')}, load average {tuple(m['load_before'])} before, "
                  f"{tuple(m['load_after'])} after, {m['seconds']:.0f} s.", "",
                  f"Program: `jax.jit(jax.value_and_grad(lambda p, b: task.loss(p, b, key, True, step)[0]))` at "
                  f"batch {memory['batch']}, step 0 (EoMT: every masked block masked, so its 2 intermediate "
                  "predictions are made and supervised), built-in configs at the image size shown, "
                  "`segmentation.num_points` as shown (0 = full-resolution masks: the mask logits bilinearly "
                  "upsampled to the image for matching and loss). Numbers from `jit(...).lower(...).compile()."
                  "memory_analysis()` of the XLA CPU executable: *temp* is its preallocated scratch heap (the peak of "
                  "the simultaneously live intermediates under XLA's schedule), *args* the parameters + batch, "
                  "*outputs* loss + gradients; **peak = temp + args + outputs - aliases** (no donation here, so "
                  "aliases are 0): the memory the executable needs while it runs. It is XLA CPU's buffer "
                  "assignment, not a measured RSS; GPU/TPU schedules differ. 'model fwd+bwd only': the same "
                  "forward (train=True, step 0) differentiated through the sum of every output, no loss; 'loss "
                  "fwd+bwd only': `task.loss` on given model outputs (args = outputs + batch), differentiated with "
                  "respect to the outputs." + ("" if any(r["head"] == "mask2former" and r["size"] == 256
                                                     for r in memory["rows"]) else
                  " Mask2Former's step at 256x256 is not compiled by default (`--m2f-memory-sizes 64,128,256`, "
                  "minutes more on this machine)."), "",
                  "| program | head | image | batch | num_points | temp MiB | args MiB | outputs MiB | peak MiB | "
                  "compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in memory["rows"]:
            kind = {"step": "train step", "model": "model fwd+bwd only", "loss": "loss fwd+bwd only"}[r["kind"]]
            if r["remat"]:
                kind += " (remat)"
            pts = "-" if r["num_points"] is None else (r["num_points"] or "0 (full)")
            lines.append(f"| {kind} | {r['head']} | {r['size']} | {r.get('batch', memory['batch'])} | {pts} | "
                         f"{r['temp'] / MIB:.1f} | "
                         f"{r['arguments'] / MIB:.1f} | {r['outputs'] / MIB:.1f} | {r['peak'] / MIB:.1f} | "
                         f"{r['compile_s']:.0f} |")
        lines += ["", "Point / full ratios (goal: train-step peak with points <= 0.5 x the full-mask peak at 64x64 "
                  "or larger):", "", "| program | head | image | num_points | peak point/full | temp point/full | "
                  "goal (<= 0.5) |", "|---|---|---|---|---|---|---|"]
        for r in memory["ratios"]:
            kind = {"step": "train step", "loss": "loss only"}[r["kind"]]
            lines.append(f"| {kind} | {r['head']} | {r['size']} | {r['num_points']} | {r['peak_ratio']:.2f} | "
                         f"{r['temp_ratio']:.2f} | {'met' if r['goal_met'] else '**not met**'} |")
        lines += ["", f"Single arrays (MiB, float32, batch {memory['batch']}; EoMT's ViT-Ti/8: one attention score "
                  "matrix of one block, one stride-4 feature map of the upscaler, which runs before every supervised "
                  "prediction; the loss's with M = 9 slots, Q = 16 queries, per prediction except the targets; "
                  "P = num_points, 3P importance-sampling candidates):", ""]
        keys = sorted({k for row in memory["arrays"] for k in row if k != "size"},
                      key=lambda s: (not s.startswith("model"), s[0] == "p", s))
        lines += ["| image | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for row in memory["arrays"]:
            lines.append(f"| {row['size']} | " + " | ".join(f"{row[k]:.2f}" if k in row else "-" for k in keys)
                         + " |")
        if memory.get("analysis"):
            lines += ["", memory["analysis"]]
        lines.append("")
    if empty:
        m = empty["meta"]
        s = empty["shapes"]
        lines += ["## 3. The empty-mask rule of masked attention", "",
                  f"`{m['command']}` — {m['date']}, commit {m.get('commit', '?')}, load average {tuple(m['load_before'])}.", "",
                  f"(a), (b): q [{s['batch']}, {s['queries']}, {s['heads']}, {s['head_dim']}], k, v "
                  f"[{s['batch']}, {s['keys']}, ...], a random 30% key mask per query, and queries "
                  f"{s['empty_queries']} with an empty mask (no allowed key). Gradient: of sum(out^2) with respect "
                  "to q, k, v. (c): Mask2Former-style decoder (dim 128, 4 heads, 3 layers (one per level), 16 queries, levels 4x4, "
                  "8x8, 16x16) at random weights, positive features and the mask MLP's last layer set to output "
                  "-1 everywhere, so every predicted mask (before every layer) is empty; gradient of "
                  "sum(class logits) + sum(sin(mask logits)) with respect to parameters and features.", "",
                  "| part | implementation | rule | output finite | gradient finite | empty rows |",
                  "|---|---|---|---|---|---|"]
        for r in empty["rows"]:
            lines.append(f"| {r['part']} | {r['implementation']} | {r['rule']} | {_yes(r['output_finite'])} | "
                         f"{_yes(r['grad_finite'])} | {r['empty_rows']} |")
        lines += ["", "Mask2Former's decoder calls `nn.MultiheadAttention` (the NaN row above in training mode) and "
                  "therefore un-masks empty rows first (`attn_mask[torch.where(attn_mask.sum(-1) == "
                  "attn_mask.shape[-1])] = False`): attend everywhere, which is `fallback_to_all=True` / "
                  "`empty_mask_rule='attend_all'` here. 'attend_none' (maskjax's never-NaN rule) gives those "
                  "queries zero cross-attention output and zero gradient through it, on every backend.", ""]
    if split:
        m = split["meta"]
        lines += ["## 4. Where EoMT's train step goes", "",
                  f"`{m['command']}` — {m['date']}, commit {m.get('commit', '?')}, load average {tuple(m['load_before'])} before, "
                  f"{tuple(m['load_after'])} after.", "",
                  f"{split['config']}, batch {split['batch']} of built-in images, step 0 (all masked blocks "
                  f"masked: {split['num_predictions']} supervised predictions). Each part is its own jitted program; "
                  f"median (min) of {split['repeats']} alternating rounds. The parts overlap (the step is not their "
                  "sum: XLA fuses across them). 'loss' = crop, panoptic targets, Hungarian matching, point sampling "
                  "(or full masks), class/BCE/dice terms for every prediction, differentiated with respect to the "
                  "model outputs. The 'point loss piece' rows time parts of the point-sampled loss alone, at its "
                  "shapes (M = target slots), to show what makes it slower than the full-mask loss on this CPU.",
                  "", "| part | median ms | min ms | share of step (median) | GFLOP |",
                  "|---|---|---|---|---|"]
        for r in split["rows"]:
            lines.append(f"| {r['part']} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} | "
                         f"{r['share_of_step']:.0%} | {r['gflop']:.2f} |")
        lines.append("")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "segmentation_bench.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(RESULTS, "segmentation_bench.json"), "w") as f:
        json.dump({"jax": jax.__version__, **results}, f, indent=1, default=float)


def memory_analysis_text(memory: dict) -> str:
    """What dominates, in words, from the rows (model alone vs loss alone vs the step)."""
    rows = {r["name"]: r for r in memory["rows"]}
    steps = [r for r in memory["ratios"] if r["kind"] == "step"]
    met = [r for r in steps if r["goal_met"]]
    parts = [f"Goal (train-step peak with points <= 0.5 x full masks): met in {len(met)} of {len(steps)} cases; "
             f"point/full peak ratios {min(r['peak_ratio'] for r in steps):.2f} to "
             f"{max(r['peak_ratio'] for r in steps):.2f}." if steps else ""]
    worse = [r for r in steps if r["peak_ratio"] > 1.0]
    if worse:
        parts.append("Point sampling needs *more* memory than full masks in: " + ", ".join(
            f"{r['head']} {r['size']}x{r['size']} with {r['num_points']} points ({r['peak_ratio']:.2f}x)"
            for r in worse) + ". Importance sampling draws 3 x num_points candidate points per target mask "
            "(coordinates, their random bits, bilinear gathers of 4 corners, top-k): " + ", ".join(
                f"{3 * r['num_points']} candidates vs {r['size'] ** 2} pixels at {r['size']}x{r['size']}"
                for r in {(w["num_points"], w["size"]): w for w in worse}.values())
            + "; so near or above a third of the pixel count the point path handles more values than the full "
            "masks do.")
    for size in sorted({r["size"] for r in memory["rows"] if r["kind"] == "model"}):
        model = rows.get(f"model/eomt/{size}")
        remat = rows.get(f"model-remat/eomt/{size}")
        full = rows.get(f"loss/eomt/{size}/0")
        step_full = rows.get(f"step/eomt/{size}/0")
        losses = [rows[f"loss/eomt/{size}/{p}"] for p in (1024, 12544) if f"loss/eomt/{size}/{p}" in rows]
        if not (model and full and step_full):
            continue
        text = (f"EoMT {size}x{size}: the model's forward+backward alone needs {model['peak'] / MIB:.0f} MiB peak "
                f"({model['peak'] / step_full['peak']:.0%} of the full-mask step's {step_full['peak'] / MIB:.0f} "
                f"MiB); the loss alone {full['peak'] / MIB:.0f} MiB with full masks vs " + ", ".join(
                    f"{r['peak'] / MIB:.0f} MiB with {r['num_points']} points (point/full "
                    f"{r['peak'] / full['peak']:.2f})" for r in losses) + ".")
        if remat:
            text += (f" With model.remat=True the model alone needs {remat['peak'] / MIB:.0f} MiB "
                     f"({remat['peak'] / model['peak']:.2f}x without).")
        parts.append(text)
    parts.append("So point sampling does shrink the loss's own memory when num_points is well below the pixel "
                 "count, but the step's peak is set by the model's activations (attention scores of the ViT "
                 "blocks, EoMT's stride-4 upscaled features computed before each of its supervised predictions, "
                 "MLP activations), which the loss does not touch. The point path builds no full-resolution target "
                 "masks (it reads each point's 4 corner ids from the [B, H, W] id map); the full-mask path compares "
                 "[B, M, H*W] one-hot targets with [B, Q, H*W] upsampled logits per supervised prediction. See the "
                 "single-array sizes above.")
    recipe = [r for r in steps if r["head"] == "mask2former-recipe"]
    if recipe:
        parts.append("In Mask2Former's own setting (mask2former-recipe rows: 100 queries, 9 decoder layers, so 10 "
                     "supervised predictions, 100 target slots, batch 16) the point/full peak is " +
                     ", ".join(f"{r['peak_ratio']:.2f} at {r['size']}x{r['size']}" for r in recipe) +
                     f" ({recipe[0]['num_points']} points). The point path's own buffers ([B, M, P] per supervised "
                     "prediction: the points, the sampled logits and targets kept for the backward pass) do not "
                     "grow with the image while the full path's ([B, Q, H*W]) do, so the ratio falls with the size; "
                     "by the size where full masks would cost more than points, the model's activations (the ViT's "
                     "attention over (size/8)^2 tokens, the decoder's masked attention over the finest level) set "
                     "both peaks.")
    for head, label in (("mask2former-paper-scan", "with the backbone's blocks scanned and rematerialised"),
                        ("mask2former-paper", "without scan or remat")):
        paper = [r for r in steps if r["head"] == head]
        if paper:
            parts.append(f"In Mask2Former's training regime (mask2former-paper rows: its decoder and 100 target "
                         f"slots, stride-4 mask features, crops up to 1024x1024, batch {PAPER_BATCH} per device; "
                         f"backbone ViT-S/16 {label}) the point/full peak is " +
                         ", ".join(f"{r['peak_ratio']:.2f} at {r['size']}x{r['size']}" for r in paper) +
                         (" — the goal is met there" if all(r["goal_met"] for r in paper) else
                          " — the goal is met at " + (", ".join(f"{r['size']}x{r['size']}" for r in paper
                                                                if r["goal_met"]) or "no size")) + ".")
    if any(r["head"] == "mask2former-paper-scan" for r in steps):
        parts.append("On XLA's CPU backend remat lowers the peak only for blocks under scan (unrolled, the "
                     "scheduler moves the recomputation forward: experiments/results/scan_remat.md); EoMT runs its "
                     "encoder in two ranges and cannot scan, which is why its 'remat' row above does not shrink.")
    return "What dominates: " + " ".join(p for p in parts if p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (speed, split)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, memory at 64 and 128 only")
    parser.add_argument("--large-batches", default="1,8", help="batch sizes of the ViT-S/8 128x128 speed setting")
    parser.add_argument("--memory-sizes", default="64,128,256")
    parser.add_argument("--m2f-memory-sizes", default="64,128", help="sizes at which Mask2Former's step is "
                        "compiled too (256x256 takes minutes more)")
    parser.add_argument("--memory-split-sizes", default="256", help="sizes of the model-alone / loss-alone rows")
    parser.add_argument("--no-remat", action="store_true", help="skip the model-alone row with model.remat=True")
    parser.add_argument("--recipe-memory-sizes", default="128,256,512", help="sizes of the Mask2Former-recipe rows "
                        "(100 queries, 9 decoder layers, 100 target slots)")
    parser.add_argument("--paper-memory-sizes", default="512,1024", help="sizes of the Mask2Former-paper rows "
                        "(the recipe on ViT-S/16, stride-4 masks, batch 2 per device)")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    sizes = (64, 128) if args.quick else tuple(int(s) for s in args.memory_sizes.split(","))
    split_sizes = (128,) if args.quick else tuple(int(s) for s in args.memory_split_sizes.split(",") if s)
    command = "python experiments/segmentation/bench.py" + "".join(
        f" {a}" for a in sys.argv[1:])
    path = os.path.join(RESULTS, "segmentation_bench.json")
    results = {}
    if os.path.exists(path) and set(args.sections) != set(SECTIONS):
        with open(path) as f:
            results = {k: v for k, v in json.load(f).items() if k in SECTIONS}
    total_start = time.perf_counter()
    for section in args.sections:
        load_before, start = os.getloadavg(), time.perf_counter()
        print(f"== {section}", flush=True)
        if section == "speed":
            out = bench_speed(repeats, tuple(int(b) for b in args.large_batches.split(",")), (1, 32))
        elif section == "memory":
            out = bench_memory(sizes, tuple(int(s) for s in args.m2f_memory_sizes.split(",")),
                               split_sizes=split_sizes, remat=not args.no_remat,
                               recipe_sizes=() if args.quick else tuple(
                                   int(s) for s in args.recipe_memory_sizes.split(",") if s),
                               paper_sizes=() if args.quick else tuple(
                                   int(s) for s in args.paper_memory_sizes.split(",") if s))
            out["analysis"] = memory_analysis_text(out)
        elif section == "empty":
            out = bench_empty()
        else:
            out = bench_split(repeats)
        out["meta"] = meta(command, load_before, os.getloadavg(), time.perf_counter() - start)
        results[section] = out
        write(results)  # after every section, so an interrupted run keeps what it measured
    print(f"total {time.perf_counter() - total_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
