"""maskjax.plan: per-device state bytes against real shards, the HLO collective parser, bad input, the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from maskjax import plan
from maskjax.train import devices as devices_lib
from maskjax.train.config import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config():
    """The cheapest config: ViT mu/4 on 32x32 built-in shapes, with 8 heads and a 64-wide MLP so that a model axis of
    4 or 8 splits real dimensions (tensor parallelism), not only replicates them."""
    config = load_config_file(os.path.join(REPO, "configs/vit_builtin.py")).get_config("runlocal")
    config.model.num_heads = 8
    return config


def real_bytes_on(tree, device) -> int:
    """Bytes of `tree`'s arrays that live on `device`: an independent count from the arrays' own shards."""
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
               if shard.device == device)


@pytest.mark.parametrize("mesh", ["data:8", "data:2,model:4"])  # fsdp:8: test_plan_of_a_tiny_fsdp_run
def test_state_bytes_match_real_shards(mesh):
    config = tiny_config()
    devices = jax.devices()[:8]
    plan.apply_mesh(config, plan.parse_mesh(mesh), len(devices), mesh)
    trainer, _, _, _ = plan.planning_trainer(config, devices, channels=3)
    planned = plan.state_bytes_per_device(trainer._abstract_state, trainer.state_shardings)
    state = trainer._create_state()  # real arrays, created with the trainer's shardings
    for device in devices:
        assert real_bytes_on(state.params, device) == planned["params"], (mesh, device)
        assert real_bytes_on(state.opt_state, device) == planned["opt_state"], (mesh, device)
    total_params = sum(x.nbytes for x in jax.tree.leaves(jax.device_get(state.params)))
    if mesh == "data:8":  # replicated: every device holds everything
        assert planned["params"] == total_params
    else:  # sharded: less than everything on each device
        assert planned["params"] < total_params


def test_plan_of_a_tiny_fsdp_run():
    """The whole planner on 8 devices: the same state bytes, a per-device cost analysis, FSDP's collectives."""
    config = tiny_config()
    devices = jax.devices()[:8]
    plan.apply_mesh(config, plan.parse_mesh("fsdp:8"), len(devices), "fsdp:8")
    result = plan.plan(config, device_kind="tpu_v5e", devices=devices, channels=3)
    trainer, _, _, _ = plan.planning_trainer(config, devices, channels=3)
    state = trainer._create_state()
    assert real_bytes_on(state.params, devices[3]) == result["memory"]["params_bytes"]
    assert real_bytes_on(state.opt_state, devices[3]) == result["memory"]["opt_state_bytes"]
    assert result["flops"]["cost_analysis_scope"] == "per device"
    assert result["memory"]["fits"] is True and result["memory"]["activations_and_temporaries_bytes"] > 0
    assert result["prediction"]["step_s"] > 0 and 0 < result["prediction"]["mfu"] < 1
    sent = {k: v["bytes"] for k, v in result["collectives"].items()}
    assert sent["all-gather"] > 0 and sent["reduce-scatter"] > 0  # FSDP: gather parameters, scatter gradients


HLO = """HloModule test, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%cond (c: (s32[], f32[256])) -> pred[] {
  %c = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (b: (s32[], f32[256])) -> (s32[], f32[256]) {
  %b = (s32[], f32[256]{0}) parameter(0)
  %j = s32[] get-tuple-element(%b), index=0
  %v = f32[256]{0} get-tuple-element(%b), index=1
  %loop_ar = f32[256]{0} all-reduce(%v), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %t = (s32[], f32[256]{0}) tuple(%j, %loop_ar)
}

ENTRY %main (p: f32[1024], q: bf16[64,32], w: (s32[], f32[256])) -> f32[512] {
  %p = f32[1024]{0} parameter(0)
  %q = bf16[64,32]{1,0} parameter(1)
  %w = (s32[], f32[256]{0}) parameter(2)
  %ar = f32[1024]{0} all-reduce(%p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %ag = bf16[256,32]{1,0} all-gather(%q), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %ar2 = f32[1024]{0} all-reduce(%p), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, to_apply=%add
  %zero = s32[] constant(0)
  %ds = f32[512]{0} dynamic-slice(%ar2, %zero), dynamic_slice_sizes={512}
  %cp = f32[1024]{0} collective-permute(%p), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %loop = (s32[], f32[256]{0}) while(%w), condition=%cond, body=%body
  ROOT %out = f32[512]{0} add(%ds, %ds)
}
"""


def test_collective_parser_on_handwritten_hlo():
    stats = plan.collective_stats(HLO, 8, domain_size=4)
    # all-reduce f32[1024] (4096 B) over groups of 4: 2 * 3/4 * 4096 = 6144; plus the loop's f32[256] (1024 B) over
    # 8, three trips: 3 * 2 * 7/8 * 1024 = 5376.
    assert stats["all-reduce"]["bytes"] == 6144 + 5376
    assert stats["all-reduce"]["count"] == 1 + 3
    # all-gather to bf16[256,32] (16384 B) over groups of 4 ([2,4]<=[8]): 3/4 * 16384.
    assert stats["all-gather"]["bytes"] == 12288
    # all-reduce read only through a half-size dynamic-slice over groups of 2 = reduce-scatter to f32[512] (2048 B):
    # (2 - 1) * 2048. Its groups {0,4}, {1,5}, ... span the domains {0..3}, {4..7}.
    assert stats["reduce-scatter"] == {"count": 1, "bytes": 2048, "bytes_scaleout": 2048}
    assert stats["collective-permute"]["bytes"] == 4096
    assert stats["all-to-all"]["count"] == 0
    assert stats["all-reduce"]["bytes_scaleout"] == 5376  # only the 8-device loop all-reduce leaves a domain


def test_replica_group_forms():
    assert plan.replica_groups("replica_groups={{0,2},{1,3}}", 4) == [[0, 2], [1, 3]]
    assert plan.replica_groups("replica_groups={}", 4) == [[0, 1, 2, 3]]
    assert plan.replica_groups("replica_groups=[2,2]<=[2,2]T(1,0)", 4) == [[0, 2], [1, 3]]
    # The mesh form: device_ids laid out over the mesh axes, groups along the named axes.
    transposed = "replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'%s'}"
    assert plan.replica_groups(transposed % "axis_1", 4) == [[0, 2], [1, 3]]
    assert plan.replica_groups(transposed % "axis_0", 4) == [[0, 1], [2, 3]]
    assert plan.replica_groups("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}", 4) == [[0, 2], [1, 3]]


def test_collective_parser_on_a_jitted_psum():
    mesh = jax.make_mesh((8,), ("i",))
    psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "i"), mesh=mesh, in_specs=P("i"), out_specs=P()))
    x = jax.ShapeDtypeStruct((8, 256), jnp.float32, sharding=NamedSharding(mesh, P("i")))
    stats = plan.collective_stats(psum.lower(x).compile().as_text(), 8)
    # Each device holds f32[1, 256] = 1024 bytes; a ring all-reduce over 8 sends 2 * 7/8 * 1024 = 1792 bytes.
    assert stats["all-reduce"]["bytes"] == 1792
    assert sum(v["bytes"] for k, v in stats.items() if k != "all-reduce" and k != "_notes") == 0
    # Groups of a 2-D mesh, whatever form XLA prints them in: mesh position = device id, 'b' the fast axis.
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    x = jax.ShapeDtypeStruct((8, 256), jnp.float32, sharding=NamedSharding(mesh, P(("a", "b"))))
    for axis, groups in (("a", [[0, 4], [1, 5], [2, 6], [3, 7]]), ("b", [[0, 1, 2, 3], [4, 5, 6, 7]])):
        psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, axis), mesh=mesh, in_specs=P(("a", "b")),
                                     out_specs=P("b" if axis == "a" else "a")))
        text = psum.lower(x).compile().as_text()
        line = next(line for line in text.splitlines() if " all-reduce(" in line)
        assert sorted(plan.replica_groups(line, 8)) == groups, line
        crossing = plan.collective_stats(text, 8, domain_size=4)["all-reduce"]["bytes_scaleout"]
        assert (crossing > 0) == (axis == "a")


def test_matmul_flops_count_loops():
    def f(w, xs):
        return jax.lax.scan(lambda c, x: (c + x @ w, None), jnp.zeros((4, 16)), xs)[0]
    lowered = jax.jit(f).lower(jnp.ones((8, 16)), jnp.ones((5, 4, 8)))
    stats = plan.compute_stats(plan.analyse_hlo(lowered.compile().as_text()))
    assert stats["matmul_flops"] == 5 * 2 * 4 * 8 * 16  # XLA's cost_analysis counts the loop body once


def test_captured_arrays_count_as_constants():
    """A step that closes over an array (a frozen tokenizer) holds it as an HLO constant, outside memory_analysis."""
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(256, 512)), jnp.float32)
    compiled = jax.jit(lambda x: x @ weights).lower(jax.ShapeDtypeStruct((4, 256), jnp.float32)).compile()
    assert compiled.memory_analysis().argument_size_in_bytes == 4 * 256 * 4  # the constant is not an argument
    assert plan.compute_stats(plan.analyse_hlo(compiled.as_text()))["constant_bytes"] >= 256 * 512 * 4
    assert plan.compute_stats(plan.analyse_hlo(HLO))["constant_bytes"] == 8  # two s32 scalars


def test_bad_input_errors():
    with pytest.raises(ValueError, match="tpu_v9.*known kinds: tpu_v4, tpu_v5e"):
        devices_lib.device_spec("tpu_v9")
    for bad in ("data=8", "data:x", "pipeline:2", "data:2,data:4", "", "data:0"):
        with pytest.raises(ValueError, match="--mesh="):
            plan.parse_mesh(bad)
    config = tiny_config()
    with pytest.raises(ValueError, match=r"--mesh=data:3,fsdp:2 does not fit --devices=8"):
        plan.apply_mesh(config, plan.parse_mesh("data:3,fsdp:2"), 8, "data:3,fsdp:2")
    with pytest.raises(ValueError, match=r"--mesh=data:-1,fsdp:3 does not fit --devices=8.*not divisible by 3"):
        plan.apply_mesh(config, plan.parse_mesh("data:-1,fsdp:3"), 8, "data:-1,fsdp:3")
    assert plan.parse_mesh("data:-1,fsdp:16") == {"data": -1, "fsdp": 16, "model": 1}
    # The command line refuses before compiling anything.
    base = ["plan", f"--config={REPO}/configs/vit_builtin.py:runlocal", "--devices=8"]
    for extra, message in ((["--device_kind=tpu_v9"], "unknown device kind 'tpu_v9'"),
                           (["--device_kind=h100", "--mesh=data:3"], "--mesh=data:3 does not fit --devices=8"),
                           (["--device_kind=h100", "--mesh=model8"], "has no ':size'")):
        with pytest.raises(SystemExit, match=message):
            plan.main(base + extra)


def test_detect_device_kind():
    cases = {"TPU v4": "tpu_v4", "TPU v5 lite": "tpu_v5e", "TPU v5": "tpu_v5p", "TPU v5p": "tpu_v5p",
             "TPU v6 lite": "tpu_v6e", "NVIDIA H100 80GB HBM3": "h100", "NVIDIA A100-SXM4-40GB": "a100_40gb",
             "NVIDIA A100-SXM4-80GB": "a100_80gb", "NVIDIA H200": "h200", "NVIDIA B200": "b200", "cpu": "cpu",
             "NVIDIA H100 PCIe": None, "NVIDIA GeForce RTX 4090": None}
    for kind, expected in cases.items():
        assert devices_lib.detect_device_kind(kind) == expected, kind
    assert devices_lib.detect_device_kind(jax.devices()[0]) == "cpu"
    for name, spec in devices_lib.DEVICE_KINDS.items():
        assert spec.name == name
        if name != "cpu":
            assert spec.peak_flops and spec.hbm_bytes and spec.hbm_bandwidth and spec.collective_bandwidth


@pytest.mark.slow
def test_cli_writes_the_plan(tmp_path):
    out = tmp_path / "plan.json"
    run = subprocess.run(
        [sys.executable, "-m", "maskjax.plan", "--config=configs/vit_builtin.py:runlocal", "--devices=4",
         "--mesh=fsdp:4", "--device_kind=h100", f"--json={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| parameters |" in run.stdout and "MFU" in run.stdout
    result = json.loads(out.read_text())
    assert result["devices"] == 4 and result["mesh"] == {"data": 1, "fsdp": 4, "model": 1}
    assert result["command"].startswith("python -m maskjax.plan") and result["commit"]
    assert np.isfinite(result["prediction"]["step_s"])
