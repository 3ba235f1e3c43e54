"""Config validation fails before any compute, naming the bad key and value."""

import re
import subprocess
import sys

import ml_collections
import pytest

from maskjax.train import config as config_lib
from tests.configs import override


def _config(**overrides):
    c = config_lib.base_config()
    return override(c, **overrides)


def test_base_config_is_valid_on_any_device_count():
    for devices in (1, 2, 8):
        config_lib.validate(_config(), num_devices=devices)


@pytest.mark.parametrize("overrides, expected", [
    (dict(data__image_size=30), "data.image_size=30"),
    (dict(model__variant="Tx/4"), "model.variant='Tx/4'"),
    (dict(model__posemb="rope"), "model.posemb='rope'"),
    (dict(batch_size=60), "batch_size=60"),
    (dict(optimizer__name="adagradx"), "optimizer.name='adagradx'"),
    (dict(optimizer__warmup_steps=10_000), "optimizer.warmup_steps=10000"),
    (dict(mesh__data=-1, mesh__fsdp=-1), "mesh.fsdp=-1"),
    (dict(mesh__data=3), "mesh"),
    # The registered names grow with every family: the message must list them, whatever they are today.
    (dict(task="segmentation_of_dreams"), re.compile(r"config\.task='segmentation_of_dreams': unknown task; "
                                                     r"registered: (\w+, )*classification, (\w+, )*mim\b")),
    (dict(model__name="vitt"), re.compile(r"config\.model\.name='vitt': unknown model; registered: (\w+, )*mae, "
                                          r"(\w+, )*vit\. Did you mean 'vit'\?")),
    (dict(model__name="mae"), "config.model.name='mae': task 'classification' trains ('vit',)"),
    (dict(classification__masksub_ratio=1.0), "classification.masksub_ratio=1.0"),
    (dict(classification__masksub_ratio=0.5, model__attention__mask="window_2d"),
     "classification.masksub_ratio=0.5: cannot be combined"),
    (dict(evals__eval__type="metricz"), re.compile(r"config\.evals\.eval\.type='metricz': unknown evaluator type; "
                                                   r"registered: (\w+, )*gallery, (\w+, )*metrics, (\w+, )*probe"
                                                   r"(, \w+)*\. Did you mean 'metrics'\?")),
    (dict(evals__eval__every=-2), "config.evals.eval.every=-2"),
    (dict(model__remat_policy="everything"), "config.model.remat_policy='everything': must be one of"),
    (dict(profile_steps=(3, 2)), "config.profile_steps=(3, 2): must be () or (first, last)"),
    (dict(model__scan_layers=True, model__attention__approx_layers=(0,)), "config.model.scan_layers=True"),
    (dict(model__scan_layers=True, model__attention__mask="swin"), "model.attention.mask='swin' with shifted"),
    (dict(evals__eval__examplez=3), "Unknown config key 'evals.eval.examplez'. Did you mean 'evals.eval.examples'"),
])
def test_bad_values_name_key_and_value(overrides, expected):
    with pytest.raises(ValueError) as error:
        config_lib.validate(_config(**overrides), num_devices=8)
    if isinstance(expected, re.Pattern):
        assert expected.search(str(error.value)), str(error.value)
    else:
        assert expected in str(error.value)


def test_batch_not_divisible_by_devices_names_both():
    with pytest.raises(ValueError) as error:
        config_lib.validate(_config(batch_size=12), num_devices=8)
    assert "batch_size=12" in str(error.value) and "8" in str(error.value)


def test_accumulation_micro_batch_must_fit_mesh():
    config_lib.validate(_config(batch_size=64, optimizer__accum_steps=4), num_devices=8)
    with pytest.raises(ValueError, match="micro-batch 4"):
        config_lib.validate(_config(batch_size=64, optimizer__accum_steps=16), num_devices=8)


def test_unknown_key_is_named_with_suggestion():
    c = _config()
    c.optimizer.learnig_rate = 1.0
    with pytest.raises(ValueError) as error:
        config_lib.check_known_keys(c)
    assert "optimizer.learnig_rate" in str(error.value)
    assert "optimizer.learning_rate" in str(error.value)


def test_mesh_fill():
    mesh = ml_collections.ConfigDict(dict(data=2, fsdp=-1, model=2))
    assert config_lib.resolve_mesh_shape(mesh, 8) == dict(data=2, fsdp=2, model=2)
    with pytest.raises(ValueError, match="mesh.fsdp"):
        config_lib.resolve_mesh_shape(ml_collections.ConfigDict(dict(data=3, fsdp=-1, model=1)), 8)


def _run_main(workdir, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "maskjax.main", "--config=configs/vit_builtin.py:runlocal", f"--workdir={workdir}",
         *overrides], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_command_line_rejects_mistyped_override(tmp_path):
    result = _run_main(tmp_path, "--config.optimizer.learnig_rate=0.1")
    assert result.returncode != 0
    assert "optimizer.learnig_rate" in result.stderr
    assert "optimizer.learning_rate" in result.stderr  # The suggestion.
    assert not (tmp_path / "checkpoints").exists()  # Failed before any compute.


@pytest.mark.slow
def test_command_line_rejects_bad_patch_size(tmp_path):
    result = _run_main(tmp_path, "--config.data.image_size=30")
    assert result.returncode != 0
    assert "data.image_size=30" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def _load_config_file(name):
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, arg", [
    ("vit_builtin.py", None), ("vit_builtin.py", "runlocal"), ("vit_fashion_mnist.py", None),
    ("vit_fashion_mnist.py", "runlocal"), ("vit_local_window.py", None), ("vit_local_window.py", "runlocal"),
    ("vit_local_window.py", "mask=swin"), ("vit_local_window.py", "mask=directional_2d,radius=1"),
    ("mae_builtin.py", None), ("mae_builtin.py", "runlocal"), ("mae_builtin.py", "masking=block,mode=mask_token"),
    ("mae_fashion_mnist.py", None), ("mae_fashion_mnist.py", "runlocal"), ("mae_imagenet.py", None),
])
def test_config_files_validate_and_build_their_models(name, arg):
    from maskjax.tasks.classification import vit_from_config
    c = _load_config_file(name).get_config(arg)
    config_lib.validate(c, num_devices=8)
    model = vit_from_config(c.model)
    assert model.token_mask.kind == c.model.attention.mask
    if name == "mae_imagenet.py":
        assert c.total_steps == 1600 * (1_281_167 // 4096) and c.optimizer.learning_rate == 1.5e-4 * 16
        assert (model.width, model.depth, model.num_heads) == (768, 12, 12) and c.mim.mask_ratio == 0.75
    if name == "vit_local_window.py":
        assert model.token_mask.kind == (arg or "mask=window_2d").split(",")[0].split("=")[-1].replace(
            "runlocal", "window_2d")


def test_model_size_overrides_are_checked():
    from maskjax.tasks.classification import vit_from_config
    c = _config(model__width=96, model__num_heads=6, model__mlp_dim=384, model__depth=2)
    config_lib.validate(c, num_devices=8)
    model = vit_from_config(c.model)
    assert (model.width, model.num_heads, model.mlp_dim, model.depth) == (96, 6, 384, 2)
    with pytest.raises(ValueError, match=r"model.width=100: must be divisible by num_heads=6"):
        config_lib.validate(_config(model__width=100, model__num_heads=6), num_devices=8)
    with pytest.raises(ValueError, match=r"model.num_heads=0"):
        config_lib.validate(_config(model__num_heads=0), num_devices=8)
