"""Plan a pod-sized run from a laptop: per-device memory, FLOPs, collectives, predicted step time, MFU and fit.

  python -m maskjax.plan --config=configs/mae_imagenet.py:batch=4096 --config.model.variant=L/16 \\
      --devices=256 --mesh=data:-1,fsdp:16 --device_kind=tpu_v5e [--json=plan.json]

What it does. It makes `--devices` fake host-CPU devices (`jax_num_cpu_devices`; nothing runs on an accelerator),
builds the trainer's abstract train state and its real jitted train step (`Trainer._build_state_shardings` and
`Trainer._make_train_step`, on a Trainer that skips the data loader: batches are `ShapeDtypeStruct`s of the task's
fields), lowers the step for the global batch and compiles it with XLA's CPU backend (LLVM optimisation off: the
program is never run). Nothing is allocated at the full size. From that it reports, per device:

- parameter / optimizer-state bytes: the shard shape of every state array under its sharding (what lives on one
  device), summed.
- activations + temporaries: `compiled.memory_analysis().temp_size_in_bytes`. Caveat: XLA CPU's buffer assignment
  and schedule, not the TPU/GPU one (their fusion, rematerialisation and scheduling differ; bf16 matmuls may keep f32
  temporaries on CPU).
- FLOPs: matmul FLOPs (dot and convolution instructions of the compiled per-device program, 2 x MACs, loop bodies
  times their trip count) and XLA's `compiled.cost_analysis()['flops']` (every op; on jax 0.10.2 it is per
  device: the table compares it with `lowered.cost_analysis()` of the unpartitioned program; it counts a while-loop
  body once).
  MFU uses model FLOPs: the forward + backward matmul FLOPs of the loss on the global batch without remat, /
  devices (`maskjax.train.flops`, the same definition as the trainer's MFU logs; recomputation is not useful work).
- collectives: bytes each device sends per step, per kind, read from the HLO right after SPMD partitioning (the
  partitioner is the same on every backend; later XLA CPU passes promote bf16 all-reduces to f32 and never form
  reduce-scatters). An all-reduce whose only users slice 1/n of it is counted as the reduce-scatter that TPU/GPU
  pipelines make of it. Ring factors for a group of n devices, S = the per-device result bytes: all-reduce
  2(n-1)/n S, all-gather (n-1)/n S, reduce-scatter (n-1) S, all-to-all (n-1)/n S, collective-permute S.
- HBM traffic, two bounds: matmul bytes (operands and results of the dot / convolution instructions of the
  partitioned program, in its dtypes: what remains if every elementwise op fuses into a matmul, as TPU/GPU XLA
  largely does) and the whole CPU program (operand + result bytes of every top-level op of the compiled CPU
  program: XLA CPU's fusion, and its matmuls in f32).
- step time: compute = matmul FLOPs / peak, memory = matmul bytes / HBM bandwidth, communication = sum over
  collectives of bytes / bandwidth (the device kind's `collective_bandwidth` inside a domain, `scaleout_bandwidth`
  for groups spanning domains of `domain_size` devices in mesh order). Predicted step = max(compute, memory) +
  communication (nothing overlapped: an upper estimate); also given: fully overlapped max(compute, memory,
  communication), and the pessimistic step with memory = the whole CPU program's traffic.
  MFU = model FLOPs / (step time x peak). Not modelled: per-collective latency (hundreds of small all-reduces
  before XLA combines them), kernel launch overheads, the input pipeline, loops whose trip count depends on data
  (counted once, and named in the notes).
- fit: arguments + outputs - donated aliases + temporaries + captured constants (arrays the step closes over, such
  as a frozen tokenizer: HLO constants, which memory_analysis() leaves out) against the device kind's HBM.

Errors (unknown device kind, bad --mesh, a mesh that does not divide the devices, config errors) come before any
compile. Library use: `plan(config, device_kind=..., devices=jax.devices()[:n])` returns the same numbers as a dict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import inspect
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np

from maskjax.train.config import MESH_AXES, resolve_mesh_shape
from maskjax.train.devices import DEVICE_KINDS, DeviceSpec, device_spec

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Compile options of the planning compile: the HLO passes (SPMD partitioning, fusion, buffer assignment) run as
# usual; LLVM's backend optimisation of the CPU kernels is skipped (the program is never run).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ------------------------------------------------------------------------------------------------ --mesh
def parse_mesh(text: str) -> dict[str, int]:
    """'data:-1,fsdp:16' -> {'data': -1, 'fsdp': 16, 'model': 1}: axes not named are 1. ValueError names the
    string and what is wrong with it."""
    usage = f"--mesh={text!r}: expected comma-separated axis:size pairs over {MESH_AXES}, e.g. 'data:-1,fsdp:16'"
    sizes: dict[str, int] = {}
    if not text or not text.strip():
        raise ValueError(usage)
    for part in text.split(","):
        axis, sep, size = part.strip().partition(":")
        axis = axis.strip()
        if not sep:
            raise ValueError(f"{usage} ({part.strip()!r} has no ':size')")
        if axis not in MESH_AXES:
            raise ValueError(f"{usage} (unknown axis {axis!r})")
        if axis in sizes:
            raise ValueError(f"{usage} (axis {axis!r} given twice)")
        try:
            sizes[axis] = int(size.strip())
        except ValueError:
            raise ValueError(f"{usage} (size {size.strip()!r} of axis {axis!r} is not an integer)") from None
        if sizes[axis] == 0 or sizes[axis] < -1:
            raise ValueError(f"{usage} (size {sizes[axis]} of axis {axis!r}: must be a positive size or -1)")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def apply_mesh(config, mesh: dict[str, int], num_devices: int, mesh_text: str = "") -> dict[str, int]:
    """Sets config.mesh.* from `mesh` and resolves it on `num_devices` (ValueError naming the mesh and the count)."""
    for axis, size in mesh.items():
        config.mesh[axis] = size
    try:
        return resolve_mesh_shape(config.mesh, num_devices)
    except ValueError as error:
        shown = f"--mesh={mesh_text}" if mesh_text else f"mesh {dict(mesh)}"
        raise ValueError(f"{shown} does not fit --devices={num_devices}: {error}") from None


# --------------------------------------------------------------------------------------------- HLO parsing
_ITEMSIZE = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|bf16|f16|f32|f64|c64|c128|f8e\w+)\[([^\]]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*(?:\(.*->.*)?\{\s*$")
_CALLEE_KEYS = ("calls", "to_apply", "body", "condition", "true_computation", "false_computation")


def _dims(text: str) -> list[int]:
    return [int(d.replace("<=", "")) for d in text.split(",") if d.strip()]


def shape_arrays(shape: str) -> list[tuple[str, list[int]]]:
    """[(dtype, dims)] of every array in an HLO shape string (a tuple gives several)."""
    return [(dtype, _dims(dims)) for dtype, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> float:
    total = 0.0
    for dtype, dims in shape_arrays(shape):
        size = _ITEMSIZE.get(dtype, 1 if dtype.startswith("f8") else 4)
        total += size * math.prod(dims)
    return total


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at text[start] == '('."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _split_top_level(text: str) -> list[str]:
    """Splits at commas outside (), [] and {} (operands may carry inline shapes such as f32[2,3]{1,0} %x)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    op: str
    operands: list[str]  # operand instruction names
    attrs: str
    operand_text: str = ""  # what stands between the op's parentheses (a constant's value)


def _parse_instruction(line: str) -> Optional[Instruction]:
    match = re.match(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*", line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
        shape, rest = rest[:end], rest[end:]
    else:
        space = rest.find(" ")
        if space < 0:
            return None
        shape, rest = rest[:space], rest[space:]
    op_match = re.match(r"\s*([\w\-]+)\(", rest)
    if not op_match:
        return None
    open_at = op_match.end() - 1
    close = _balanced(rest, open_at)
    operand_text = rest[open_at + 1:close - 1]
    operands = [part.split()[-1].lstrip("%") for part in _split_top_level(operand_text) if part.strip()]
    return Instruction(match.group(1), shape, op_match.group(1), operands, rest[close:], operand_text)


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """({computation name: instructions} in text order, entry computation name) of an HLO module's text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            instruction = _parse_instruction(line)
            if instruction is not None:
                computations[current].append(instruction)
    if not entry and computations:
        entry = list(computations)[-1]
    return computations, entry


def _callees(instruction: Instruction) -> list[tuple[str, str]]:
    found = []
    for key in _CALLEE_KEYS:
        for name in re.findall(rf"\b{key}=%?([^\s,{{}}]+)", instruction.attrs):
            found.append((key, name))
    for group in re.findall(r"\bbranch_computations=\{([^}]*)\}", instruction.attrs):
        found.extend(("branch", name) for name in re.findall(r"%?([^\s,]+)", group))
    return found


def _trip_count(instruction: Instruction, computations: dict) -> Optional[int]:
    """A while loop's trip count: XLA's known_trip_count annotation, else `i < constant` in its condition."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attrs)
    if known:
        return int(known.group(1))
    condition = dict(_callees(instruction)).get("condition")
    body = computations.get(condition, [])
    constants = {i.name: i for i in body if i.op == "constant"}
    for i in body:
        if i.op == "compare" and "direction=LT" in i.attrs:
            for operand in i.operands:
                if operand in constants and re.fullmatch(r"\s*-?\d+\s*", constants[operand].operand_text):
                    return int(constants[operand].operand_text)
    return None


@dataclasses.dataclass
class HloModule:
    computations: dict[str, list[Instruction]]
    entry: str
    multiplicity: dict[str, float]  # how often each computation runs per execution of the module
    top_level: set  # computations that run as programs (entry, loop bodies, branches), not fused kernels
    unknown_loops: list  # while instructions whose trip count could not be read (counted once)
    num_partitions: int


def analyse_hlo(text: str) -> HloModule:
    computations, entry = parse_hlo(text)
    multiplicity = {name: 0.0 for name in computations}
    multiplicity[entry] = 1.0
    top_level = {entry}
    unknown = []
    for name in reversed(list(computations)):  # callers are printed after their callees
        weight = multiplicity[name]
        for instruction in computations[name]:
            for key, callee in _callees(instruction):
                if callee not in multiplicity:
                    continue
                factor = 1.0
                if instruction.op == "while" and key in ("body", "condition"):
                    trips = _trip_count(instruction, computations)
                    if trips is None:
                        trips = 1
                        if key == "body":
                            unknown.append(instruction.name)
                    factor = trips + (1 if key == "condition" else 0)
                multiplicity[callee] += weight * factor
                if key in ("body", "condition", "branch", "true_computation", "false_computation") or \
                        (key == "calls" and instruction.op in ("call", "async-start")):
                    top_level.add(callee)
    partitions = re.search(r"num_partitions=(\d+)", text)
    return HloModule(computations, entry, multiplicity, top_level, unknown,
                     int(partitions.group(1)) if partitions else 1)


def _symbols(instructions: list[Instruction]) -> dict[str, str]:
    return {i.name: i.shape for i in instructions}


def _dot_flops(instruction: Instruction, symbols: dict[str, str]) -> float:
    out = shape_arrays(instruction.shape)
    if not out or not instruction.operands:
        return 0.0
    out_elements = math.prod(out[0][1])
    if instruction.op == "dot":
        lhs = shape_arrays(symbols.get(instruction.operands[0], ""))
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attrs)
        if not lhs or not contracting:
            return 0.0
        k = math.prod(lhs[0][1][int(d)] for d in contracting.group(1).split(",") if d)
        return 2.0 * out_elements * k
    # convolution: 2 x output elements x (kernel elements / kernel output features)
    if len(instruction.operands) < 2:
        return 0.0
    kernel = shape_arrays(symbols.get(instruction.operands[1], ""))
    labels = re.search(r"dim_labels=[^_]+_([^-]+)->", instruction.attrs)
    if not kernel or not labels or "o" not in labels.group(1):
        return 0.0
    kernel_dims = kernel[0][1]
    return 2.0 * out_elements * math.prod(kernel_dims) / kernel_dims[labels.group(1).index("o")]


_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "optimization-barrier"}


def compute_stats(module: HloModule) -> dict[str, float]:
    """Per execution of a (per-device) module, loops times their trip count: matmul FLOPs; bytes accessed (operand
    and result bytes of every top-level op: fused kernels count once, at their boundary); matmul bytes (operand and
    result bytes of the dot / convolution instructions alone, wherever they are)."""
    flops, traffic, matmul_traffic, constants = 0.0, 0.0, 0.0, 0.0
    for name, instructions in module.computations.items():
        weight = module.multiplicity.get(name, 0.0)
        if not weight:
            continue
        symbols = _symbols(instructions)
        for instruction in instructions:
            if instruction.op == "constant" and name in module.top_level:
                constants += shape_bytes(instruction.shape)  # arrays the program captured (a frozen tokenizer)
            moved = None
            if instruction.op in ("dot", "convolution"):
                flops += weight * _dot_flops(instruction, symbols)
                moved = shape_bytes(instruction.shape) + sum(shape_bytes(symbols.get(o, ""))
                                                             for o in instruction.operands)
                matmul_traffic += weight * moved
            if name in module.top_level and instruction.op not in _NO_TRAFFIC:
                if moved is None:
                    moved = shape_bytes(instruction.shape) + sum(shape_bytes(symbols.get(o, ""))
                                                                 for o in instruction.operands)
                traffic += weight * moved
    return {"matmul_flops": flops, "bytes_accessed": traffic, "matmul_bytes": matmul_traffic,
            "constant_bytes": constants}


def _iota_ids(spec: str) -> Optional[np.ndarray]:
    """'[16,16]T(1,0)' / '[8]' -> the device ids it lists (flat, in order)."""
    match = re.match(r"\s*\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
    if not match:
        return None
    dims = _dims(match.group(1))
    ids = np.arange(math.prod(dims)).reshape(dims)
    if match.group(2):
        ids = ids.transpose([int(p) for p in match.group(2).split(",")])
    return ids.reshape(-1)


def replica_groups(attrs: str, num_devices: int) -> Optional[list[list[int]]]:
    """The device groups of a collective's `replica_groups` in any of XLA's printed forms; None if unreadable."""
    mesh_form = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", attrs)
    if mesh_form:
        axes = re.findall(r"'([^']+)'=(\d+)", mesh_form.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        ids = _iota_ids(mesh_form.group(2)) if mesh_form.group(2) else np.arange(math.prod(sizes))
        if ids is None or ids.size != math.prod(sizes):
            return None
        grouped = re.findall(r"'([^']+)'", mesh_form.group(3))
        if any(g not in names for g in grouped):
            return None
        order = [names.index(n) for n in names if n not in grouped] + [names.index(g) for g in grouped]
        group_size = math.prod(sizes[names.index(g)] for g in grouped)
        return ids.reshape(sizes).transpose(order).reshape(-1, group_size).tolist()
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", attrs)
    if iota:
        ids = _iota_ids(iota.group(3))
        return None if ids is None else ids.reshape(int(iota.group(1)), int(iota.group(2))).tolist()
    explicit = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}", attrs)
    if explicit:
        groups = [_dims(g) for g in re.findall(r"\{([\d,\s]*)\}", explicit.group(1))]
        return groups if groups and any(groups) else [list(range(num_devices))]
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
    if pairs:
        return [_dims(p) for p in re.findall(r"\{(\d+,\d+)\}", pairs.group(1))]
    return None


def _users(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    users: dict[str, list[Instruction]] = {}
    for instruction in instructions:
        for operand in instruction.operands:
            users.setdefault(operand, []).append(instruction)
    return users


def collective_stats(text: str, num_devices: Optional[int] = None, domain_size: Optional[int] = None) -> dict:
    """Per-device bytes sent per execution of an HLO module, by collective kind (see the module docstring for the
    ring factors). Returns {kind: {'count', 'bytes', 'bytes_scaleout'}, '_notes': [...]}; `bytes_scaleout` is the
    part of `bytes` in groups that span domains of `domain_size` consecutive devices."""
    module = analyse_hlo(text)
    num_devices = num_devices or module.num_partitions
    stats = {kind: {"count": 0, "bytes": 0.0, "bytes_scaleout": 0.0} for kind in COLLECTIVE_KINDS}
    notes = []
    for name, instructions in module.computations.items():
        weight = module.multiplicity.get(name, 0.0)
        users = _users(instructions)
        for instruction in instructions:
            kind = instruction.op[:-len("-start")] if instruction.op.endswith("-start") else instruction.op
            if kind not in COLLECTIVE_KINDS or not weight:
                continue
            arrays = shape_arrays(instruction.shape)
            size = shape_bytes(instruction.shape) if not instruction.op.endswith("-start") else \
                _ITEMSIZE.get(arrays[-1][0], 4) * math.prod(arrays[-1][1]) if arrays else 0.0
            groups = replica_groups(instruction.attrs, num_devices)
            if groups is None:
                groups = [list(range(num_devices))]
                notes.append(f"{instruction.name}: replica groups not understood; counted over all {num_devices} "
                             "devices")
            n = max(len(g) for g in groups) if groups else 1
            if kind == "all-reduce" and n > 1:
                consumers = users.get(instruction.name, [])
                if consumers and all(u.op == "dynamic-slice" and
                                     abs(shape_bytes(u.shape) * n - size) < 0.5 for u in consumers):
                    kind, size = "reduce-scatter", shape_bytes(consumers[0].shape)
            if kind == "collective-permute":
                moved = size
            elif n <= 1:
                continue
            elif kind == "all-reduce":
                moved = 2.0 * (n - 1) / n * size
            elif kind == "reduce-scatter":
                moved = (n - 1) * size
            else:  # all-gather (size = gathered result), all-to-all
                moved = (n - 1) / n * size
            crosses = bool(domain_size) and any(len({d // domain_size for d in g}) > 1 for g in groups)
            entry = stats[kind]
            entry["count"] += int(weight)
            entry["bytes"] += weight * moved
            entry["bytes_scaleout"] += weight * moved if crosses else 0.0
    if module.unknown_loops:
        notes.append(f"while loops with unknown trip count counted once: {module.unknown_loops[:5]}")
    stats["_notes"] = notes
    return stats


# ------------------------------------------------------------------------------------------ the planning step
FIELD_DTYPES = {"image": np.float32, "label": np.int32, "semantic": np.int32, "instance": np.int32}


def sample_shapes(config, fields: Sequence[str], channels: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{field: (shape of one example with a leading 1, dtype)} as the loader serves them (maskjax/data/pipeline.py)."""
    size, frames = config.data.image_size, config.data.num_frames
    shapes = {}
    for field in fields:
        if field == "image":
            shapes[field] = ((1,) + ((frames,) if frames > 0 else ()) + (size, size, channels), np.float32)
        elif field == "label":
            shapes[field] = ((1,), np.int32)
        elif field in ("semantic", "instance"):
            shapes[field] = ((1, size, size), np.int32)
        else:
            raise ValueError(f"task {config.task!r}: the planner does not know the shape of batch field {field!r} "
                             f"(known: {sorted(FIELD_DTYPES)})")
    return shapes


def _image_channels(config, default: int) -> tuple[int, str]:
    """Channels of the training data when its source opens here, else `default` (with a note saying so)."""
    from maskjax.data import pipeline

    data = config.data
    try:
        video = {"num_frames": data.num_frames} if data.num_frames > 0 else {}
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints banners when a builder is missing
            source = pipeline.make_source(data.name, data.train_split, seed=data.seed, image_size=data.image_size,
                                          data_dir=data.data_dir or None, **video)
            return int(np.shape(source[0]["image"])[-1]), ""
    except Exception as error:  # noqa: BLE001 - any failure to open the data means "not available here"
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        return default, (f"data set {data.name!r} is not available here ({first}); planned with {default}-channel "
                         f"images (--channels)")


def shapes_only_load_params(workdir: str, step: int = -1, params_key: str = "", *, config_key: str = "init_from"):
    """A `load_params` for planning: zeros shaped like the parameters of the run in `workdir`, from its
    config.json (no checkpoint is read). Used for frozen tokenizers and teachers."""
    import jax
    import flax.linen as nn
    import ml_collections
    from maskjax.tasks import make_task

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"config.{config_key}.workdir={workdir!r}: has no config.json (the planner reads the run's "
                         "config for its parameter shapes)")
    with open(path) as f:
        other = ml_collections.ConfigDict(json.load(f))
    task = make_task(other, load_params=shapes_only_load_params)
    channels = int(other.model.get("channels", 3)) if "model" in other else 3
    sample = {k: np.zeros(s, d) for k, (s, d) in sample_shapes(other, task.batch_fields, channels).items()}
    abstract = jax.eval_shape(lambda k: nn.meta.unbox(task.init(k, sample))["params"], jax.random.key(0))
    for part in filter(None, params_key.split("/")):
        abstract = abstract[part]
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract), max(step, 0)


def planning_trainer(config, devices: Sequence[Any], channels: int):
    """A Trainer with its mesh, task, optimizer, state shardings and train step, without data loading: batches are
    zeros of the task's field shapes. Returns (trainer, jitted step, root key data, sample batch)."""
    import jax
    from maskjax.tasks import make_task
    from maskjax.train import sharding as sharding_lib
    from maskjax.train import trainer as trainer_lib
    from maskjax.train.optim import make_optimizer

    trainer = trainer_lib.Trainer.__new__(trainer_lib.Trainer)
    trainer.config = config
    trainer.task = make_task(config, load_params=shapes_only_load_params)
    trainer.mesh = sharding_lib.make_mesh(config.mesh, devices)
    trainer.rules = tuple(tuple(rule) for rule in config.sharding_rules)
    trainer.is_main = True
    trainer.fields = tuple(trainer.task.batch_fields)
    trainer.tx, trainer.schedule = make_optimizer(config.optimizer, config.total_steps)
    trainer.root_key = jax.random.key(config.seed)
    sample = {k: np.zeros(s, d) for k, (s, d) in sample_shapes(config, trainer.fields, channels).items()}
    trainer._sample_batch = lambda: sample  # what Trainer._sample_batch gives, without reading the data
    trainer._build_state_shardings()
    run = trainer._make_train_step()
    closure = inspect.getclosurevars(run).nonlocals
    if "jitted" not in closure or "root_key_data" not in closure:
        raise RuntimeError("maskjax.plan reads the jitted step and the root key from Trainer._make_train_step's "
                           f"`run` closure (names 'jitted', 'root_key_data'); found {sorted(closure)}: update "
                           "planning_trainer to the trainer's code")
    return trainer, closure["jitted"], closure["root_key_data"], sample


def state_bytes_per_device(abstract_state, shardings) -> dict[str, float]:
    """Bytes of each part of the train state that live on one device: the shard shape of every array."""
    import jax

    def part(tree, tree_shardings):
        leaves = jax.tree.leaves(tree)
        sharding_leaves = jax.tree.leaves(tree_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        return float(sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                         for a, s in zip(leaves, sharding_leaves)))

    return {"params": part(abstract_state.params, shardings.params),
            "opt_state": part(abstract_state.opt_state, shardings.opt_state),
            "step": part(abstract_state.step, shardings.step)}


def _lower(trainer, jitted, root_key_data, sample):
    import jax
    from maskjax.train import sharding as sharding_lib
    from maskjax.train.trainer import _mesh_context

    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         trainer._abstract_state, trainer.state_shardings)
    batch = {k: jax.ShapeDtypeStruct((trainer.config.batch_size,) + v.shape[1:], v.dtype,
                                     sharding=sharding_lib.batch_sharding(trainer.mesh, v.ndim))
             for k, v in sample.items()}
    with _mesh_context(trainer.mesh, trainer.rules):
        return jitted.lower(state, batch, root_key_data)


def plan(config, *, device_kind: str, devices: Optional[Sequence[Any]] = None, channels: Optional[int] = None,
         compile_options: Optional[dict] = None, keep_hlo: Optional[str] = None) -> dict:
    """Plans `config` on `devices` (default: all) as if they were `device_kind`. Returns the numbers as a dict."""
    import jax
    from maskjax.train.config import validate

    spec = device_spec(device_kind)
    devices = list(jax.devices() if devices is None else devices)
    validate(config, len(devices), 1)
    notes = []
    if channels is None:
        channels, note = _image_channels(config, 3)
        if note:
            notes.append(note)
    times = {}
    start = time.perf_counter()
    trainer, jitted, root_key_data, sample = planning_trainer(config, devices, channels)
    state = state_bytes_per_device(trainer._abstract_state, trainer.state_shardings)
    lowered = _lower(trainer, jitted, root_key_data, sample)
    times["trace_and_lower_s"] = time.perf_counter() - start
    global_cost = lowered.cost_analysis() or {}
    options = dict(FAST_COMPILE_OPTIONS if compile_options is None else compile_options)
    with tempfile.TemporaryDirectory(prefix="maskjax_plan_") as dump:
        # XLA writes the module after SPMD partitioning (plus its usual dump files) here; read, then deleted.
        options.update(xla_dump_to=dump, xla_dump_hlo_pass_re="spmd-partitioning")
        start = time.perf_counter()
        compiled = lowered.compile(compiler_options=options)
        times["compile_s"] = time.perf_counter() - start
        partitioned = sorted(glob.glob(os.path.join(dump, "*after_spmd-partitioning*.txt")))
        if not partitioned:
            raise RuntimeError(f"XLA wrote no HLO after SPMD partitioning to {dump} (xla_dump_hlo_pass_re)")
        with open(partitioned[-1]) as f:
            partitioned_text = f.read()
    compiled_text = compiled.as_text()
    if keep_hlo:
        os.makedirs(keep_hlo, exist_ok=True)
        for name, text in (("after_spmd_partitioning.txt", partitioned_text), ("compiled_cpu.txt", compiled_text)):
            with open(os.path.join(keep_hlo, name), "w") as f:
                f.write(text)

    cost = compiled.cost_analysis() or {}
    memory = compiled.memory_analysis()
    module = analyse_hlo(compiled_text)
    device_stats = compute_stats(module)
    if module.unknown_loops:
        notes.append(f"compiled program: while loops with unknown trip count counted once: {module.unknown_loops}")
    partitioned_stats = compute_stats(analyse_hlo(partitioned_text))
    collectives = collective_stats(partitioned_text, len(devices), spec.domain_size)
    notes.extend(collectives.pop("_notes"))
    # The trainer's definition (its MFU logs): forward + backward matmuls of the loss, traced without remat.
    model_flops_global = trainer.throughput_basis()["model_flops"]
    n = len(devices)
    model_flops = model_flops_global / n

    xla_flops = float(cost.get("flops", 0.0))
    global_flops = float(global_cost.get("flops", 0.0))
    scope_ratio = xla_flops * n / global_flops if global_flops else float("nan")
    # A per-device count of a program split over n > 1 devices is below the unpartitioned program's count (it is
    # about 1/n of it, more where work is replicated); a global count would be about equal to it.
    if n == 1 or not global_flops:
        cost_scope = "one device"
    else:
        cost_scope = "per device" if xla_flops < 0.9 * global_flops else "global (or fully replicated work)"

    memory_stats = {k: float(getattr(memory, k, 0) or 0) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
        "generated_code_size_in_bytes", "peak_memory_in_bytes")}
    # Arrays a step captures (e.g. a frozen tokenizer's parameters) are HLO constants, which memory_analysis() leaves
    # out; on an accelerator they sit in every device's memory.
    total = (memory_stats["argument_size_in_bytes"] + memory_stats["output_size_in_bytes"]
             - memory_stats["alias_size_in_bytes"] + memory_stats["temp_size_in_bytes"]
             + device_stats["constant_bytes"])

    mesh_shape = {axis: int(trainer.mesh.shape[axis]) for axis in MESH_AXES}
    result = {
        "device_kind": spec.name, "device": spec.to_dict(), "devices": n, "mesh": mesh_shape,
        "batch_size": int(config.batch_size), "batch_per_device": config.batch_size / (mesh_shape["data"]
                                                                                      * mesh_shape["fsdp"]),
        "jax_version": jax.__version__,
        "memory": {
            "params_bytes": state["params"], "opt_state_bytes": state["opt_state"], "step_bytes": state["step"],
            "activations_and_temporaries_bytes": memory_stats["temp_size_in_bytes"],
            "arguments_bytes": memory_stats["argument_size_in_bytes"],
            "outputs_bytes": memory_stats["output_size_in_bytes"],
            "donated_alias_bytes": memory_stats["alias_size_in_bytes"],
            "constants_bytes": device_stats["constant_bytes"],
            "xla_peak_memory_bytes": memory_stats["peak_memory_in_bytes"],
            "total_bytes": total,
            "hbm_bytes": spec.hbm_bytes,
            "fits": None if spec.hbm_bytes is None else bool(total <= spec.hbm_bytes),
        },
        "flops": {
            "matmul_flops_per_device": device_stats["matmul_flops"],
            "model_flops_per_device": model_flops,
            "xla_cost_analysis_flops": xla_flops,
            "xla_cost_analysis_flops_unpartitioned": global_flops,
            "cost_analysis_scope": cost_scope,
            "cost_analysis_ratio": scope_ratio,
        },
        "traffic": {
            # HBM traffic per device per step, two bounds (see the module docstring).
            "matmul_bytes": partitioned_stats["matmul_bytes"],  # dot/conv operands + results, program dtypes
            "cpu_program_bytes": device_stats["bytes_accessed"],  # every top-level op of the XLA CPU program
            "xla_cost_analysis_bytes_accessed": float(cost.get("bytes accessed", 0.0)),  # loop bodies once
        },
        "collectives": collectives,
        "times": times,
        "notes": notes,
    }
    result["prediction"] = predict(result, spec)
    return result


def predict(result: dict, spec: DeviceSpec) -> dict:
    """Step time (roofline plus non-overlapped communication), MFU and the terms they come from."""
    if spec.peak_flops is None or spec.hbm_bandwidth is None:
        return {"step_s": None, "mfu": None, "why": f"device kind {spec.name!r} has no peak figures"}
    compute = result["flops"]["matmul_flops_per_device"] / spec.peak_flops
    memory = result["traffic"]["matmul_bytes"] / spec.hbm_bandwidth
    memory_cpu = result["traffic"]["cpu_program_bytes"] / spec.hbm_bandwidth
    comm_by_kind = {}
    for kind, entry in result["collectives"].items():
        inside = entry["bytes"] - entry["bytes_scaleout"]
        seconds = inside / spec.collective_bandwidth if inside else 0.0
        if entry["bytes_scaleout"]:
            if not spec.scaleout_bandwidth:
                raise ValueError(f"device kind {spec.name!r}: the mesh puts collectives across domains of "
                                 f"{spec.domain_size} devices, and no scale-out bandwidth is recorded for it")
            seconds += entry["bytes_scaleout"] / spec.scaleout_bandwidth
        comm_by_kind[kind] = seconds
    comm = sum(comm_by_kind.values())
    step = max(compute, memory) + comm
    overlapped = max(compute, memory, comm)
    step_cpu = max(compute, memory_cpu) + comm
    model_flops = result["flops"]["model_flops_per_device"]

    def mfu(seconds):
        return model_flops / (seconds * spec.peak_flops) if seconds else None
    return {"compute_s": compute, "memory_s": memory, "memory_s_cpu_program": memory_cpu, "communication_s": comm,
            "communication_s_by_kind": comm_by_kind,
            "step_s": step, "bound": "compute" if compute >= memory else "memory",
            "step_s_overlapped": overlapped, "step_s_cpu_program": step_cpu,
            "mfu": mfu(step), "mfu_overlapped": mfu(overlapped), "mfu_cpu_program": mfu(step_cpu),
            "images_per_second": result["batch_size"] / step if step else None}


# ------------------------------------------------------------------------------------------------- output
def _gib(x: Optional[float]) -> str:
    """Bytes in binary units (B, KiB, MiB, GiB)."""
    if x is None:
        return "n/a"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} B"


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    return f"{x * 1e3:,.1f} ms" if x >= 1e-3 else f"{x * 1e6:,.1f} us"


def _flop(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} FLOP"


def table_lines(result: dict) -> list[str]:
    """The plan as a Markdown table (per device)."""
    m, f, p = result["memory"], result["flops"], result["prediction"]
    spec = result["device"]
    rows = [
        ("devices x kind", f"{result['devices']} x {spec['name']} ({spec['description']})"),
        ("mesh (data, fsdp, model)", f"{result['mesh']['data']}, {result['mesh']['fsdp']}, {result['mesh']['model']}"
                                     f"; batch {result['batch_size']} ({result['batch_per_device']:g} per device)"),
        ("parameters", _gib(m["params_bytes"])),
        ("optimizer state", _gib(m["opt_state_bytes"])),
        ("activations + temporaries (XLA CPU)", _gib(m["activations_and_temporaries_bytes"])),
        ("captured constants (e.g. frozen weights)", _gib(m["constants_bytes"])),
        ("total: args + outputs - donated + temps + constants", _gib(m["total_bytes"])),
        ("HBM / fits", f"{_gib(m['hbm_bytes'])} / "
                       f"{'n/a' if m['fits'] is None else ('yes' if m['fits'] else 'NO')}"),
        ("matmul FLOPs per step (model FLOPs)", f"{_flop(f['matmul_flops_per_device'])} "
                                                f"({_flop(f['model_flops_per_device'])})"),
        ("XLA cost_analysis FLOPs", f"{_flop(f['xla_cost_analysis_flops'])} ({f['cost_analysis_scope']}: x "
                                    f"{result['devices']} = {f['cost_analysis_ratio']:.2f} x the unpartitioned "
                                    "program's; loop bodies once)"),
        ("HBM traffic: matmul operands / whole CPU program", f"{_gib(result['traffic']['matmul_bytes'])} / "
                                                             f"{_gib(result['traffic']['cpu_program_bytes'])}"),
    ]
    for kind in COLLECTIVE_KINDS:
        entry = result["collectives"][kind]
        if entry["count"]:
            extra = f", {_gib(entry['bytes_scaleout'])} across domains" if entry["bytes_scaleout"] else ""
            rows.append((f"{kind} (sent per device)", f"{_gib(entry['bytes'])} in {entry['count']} ops{extra}"))
    if p.get("step_s") is not None:
        rows += [
            ("compute / memory / communication", f"{_ms(p['compute_s'])} / {_ms(p['memory_s'])} / "
                                                 f"{_ms(p['communication_s'])}"),
            ("predicted step: max(compute, memory) + comm", f"{_ms(p['step_s'])} ({p['bound']}-bound; "
                                                            f"{p['images_per_second']:,.0f} images/s)"),
            ("MFU (no overlap / full overlap)", f"{100 * p['mfu']:.1f} % / {100 * p['mfu_overlapped']:.1f} %"),
            ("pessimistic: memory = whole CPU program", f"memory {_ms(p['memory_s_cpu_program'])}, step "
                                                        f"{_ms(p['step_s_cpu_program'])}, MFU "
                                                        f"{100 * p['mfu_cpu_program']:.1f} %"),
        ]
    else:
        rows.append(("step time / MFU", f"n/a ({p['why']})"))
    rows.append(("trace+lower / compile (host)", f"{result['times']['trace_and_lower_s']:.1f} s / "
                                                 f"{result['times']['compile_s']:.1f} s"))
    lines = ["| per device | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return lines


def _git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


# ------------------------------------------------------------------------------------------- command line
def _set_cpu_devices(argv: list[str]) -> None:
    """Host CPU platform with --devices devices, before the backend starts (a bad value is reported later)."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            value = arg.split("=", 1)[1]
        elif arg == "--devices" and i + 1 < len(argv):
            value = argv[i + 1]
    try:
        count = int(value) if value is not None else 0
    except ValueError:
        return
    if count >= 1:
        import jax
        try:
            jax.config.update("jax_platforms", "cpu")  # the planner compiles for host CPU devices only
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError:
            pass  # the backend already runs (in-process use): main() reports a device-count mismatch


def main(argv: Optional[list[str]] = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    # The device count must be set before anything runs a JAX operation (the config's validation does), so it is
    # read ahead of the flag parsing.
    _set_cpu_devices(argv)
    flag_values = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.",
                                                  flag_values=flag_values, lock_config=True)
    devices_flag = flags.DEFINE_integer("devices", None, "Number of devices to plan for.", flag_values=flag_values)
    mesh_flag = flags.DEFINE_string("mesh", "", "Mesh axis sizes, e.g. 'data:-1,fsdp:16' (axes not named are 1; "
                                    "default: the config's mesh).", flag_values=flag_values)
    kind_flag = flags.DEFINE_string("device_kind", None, f"One of {', '.join(DEVICE_KINDS)}.",
                                    flag_values=flag_values)
    json_flag = flags.DEFINE_string("json", "", "Also write the plan as JSON to this path.", flag_values=flag_values)
    channels_flag = flags.DEFINE_integer("channels", None, "Image channels when the data set is not available here "
                                         "(default: read from the data, else 3).", flag_values=flag_values)
    hlo_flag = flags.DEFINE_string("keep_hlo", "", "Write the partitioned and the compiled HLO to this directory.",
                                   flag_values=flag_values)
    try:
        flag_values(argv)
    except (AttributeError, KeyError) as error:
        from maskjax.train.config import flat_keys, load_config_file, unknown_key_message
        spec_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        overrides = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
        if spec_arg is None:
            sys.exit(f"Error: {error}")
        path, _, arg = spec_arg.partition(":")
        valid = flat_keys(load_config_file(path).get_config(arg or None))
        unknown = [key for key in overrides if key not in valid] or overrides or [str(error)]
        sys.exit(f"Error: {unknown_key_message(unknown[0], valid)}")
    except flags.Error as error:
        sys.exit(f"Error: {error}")

    config, num_devices, kind = config_flag.value, devices_flag.value, kind_flag.value
    if config is None or num_devices is None or kind is None:
        sys.exit("Error: --config, --devices and --device_kind are required, e.g. `python -m maskjax.plan "
                 "--config=configs/mae_imagenet.py --devices=256 --mesh=data:-1,fsdp:16 --device_kind=tpu_v5e`")
    try:
        spec = device_spec(kind)
        if num_devices < 1:
            raise ValueError(f"--devices={num_devices}: must be >= 1")
        if mesh_flag.value:
            apply_mesh(config, parse_mesh(mesh_flag.value), num_devices, mesh_flag.value)
        else:
            apply_mesh(config, {a: int(config.mesh[a]) for a in MESH_AXES}, num_devices, "")
        from maskjax.train.config import validate
        validate(config, num_devices, 1)
    except ValueError as error:
        sys.exit(f"Error: {error}")
    if spec.domain_size and num_devices > spec.domain_size and not spec.scaleout_bandwidth:
        sys.exit(f"Error: --devices={num_devices} exceeds one {spec.name} domain ({spec.domain_size} devices) and no "
                 "scale-out bandwidth is recorded for it in maskjax/train/devices.py")

    import jax
    if jax.device_count() != num_devices:
        sys.exit(f"Error: asked for {num_devices} CPU devices but the backend has {jax.device_count()} (was it "
                 "initialised before maskjax.plan set jax_num_cpu_devices?)")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        result = plan(config, device_kind=kind, devices=jax.devices(), channels=channels_flag.value,
                      keep_hlo=hlo_flag.value or None)
    except ValueError as error:
        sys.exit(f"Error: {error}")
    command = "python -m maskjax.plan " + " ".join(argv[1:])
    result["command"] = command
    result["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result["commit"] = _git_commit()
    print(f"$ {command}")
    print("\n".join(table_lines(result)))
    print(NOTES)
    for note in result["notes"]:
        print(f"note: {note}")
    if json_flag.value:
        os.makedirs(os.path.dirname(os.path.abspath(json_flag.value)), exist_ok=True)
        with open(json_flag.value, "w") as f:
            json.dump(result, f, indent=2, default=float)
        print(f"wrote {json_flag.value}")
    return 0


NOTES = ("Caveats: memory and bytes accessed come from XLA CPU's compile of the same partitioned program (its "
         "fusion, buffer assignment and schedule, not the TPU/GPU ones); collective bytes from the HLO after SPMD "
         "partitioning with ring factors; step time = max(compute, memory) + communication (nothing overlapped), "
         "compute at the kind's dense bf16 peak. See the docstring of maskjax/plan.py.")


if __name__ == "__main__":
    sys.exit(main())
