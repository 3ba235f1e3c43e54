"""Fine-tuning from another run: an MAE encoder loads into a classifier (head and missing parts keep their init),
on another mesh; mismatches are named."""

import json
import shutil
import re

import flax
import jax
import numpy as np
import pytest

from configs import mae_builtin, vit_builtin
from maskjax.train import checkpoint as ckpt_lib
from maskjax.train.trainer import Trainer
from tests.configs import override


def quiet(c, **overrides):
    c.progress_bar, c.data.num_threads = False, 0
    c.evals.eval.examples, c.evals.eval.batch_size = 64, 32
    for name in ("probe", "reconstructions", "predictions"):
        if name in c.evals:
            c.evals[name].every = -1
    return override(c, **overrides)


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mae"))
    c = quiet(mae_builtin.get_config("runlocal"), total_steps=4, checkpoint_every=4, evals__eval__every=0,
              optimizer__warmup_steps=1, async_checkpointing=False)
    Trainer(c, workdir).run()
    source = ckpt_lib.Checkpointer(workdir, async_save=False)
    params = source.restore_params(4)
    source.close()
    return workdir, params


def test_mae_encoder_initialises_a_classifier_on_another_mesh(tmp_path, mae_run):
    workdir, mae_params = mae_run
    c = quiet(vit_builtin.get_config("runlocal"), model__posemb="sincos2d", init_from__workdir=workdir,
              init_from__params_key="encoder", mesh__data=4, mesh__model=2)
    trainer = Trainer(c, str(tmp_path), devices=jax.devices()[:8])
    params = flax.traverse_util.flatten_dict(jax.device_get(trainer.initial_state().params), sep="/")
    encoder = flax.traverse_util.flatten_dict(mae_params["encoder"], sep="/")
    for key, value in encoder.items():
        np.testing.assert_array_equal(params[key], value)
    fresh = flax.traverse_util.flatten_dict(jax.device_get(
        Trainer(quiet(vit_builtin.get_config("runlocal"), model__posemb="sincos2d"), str(tmp_path / "fresh"))
        .initial_state().params), sep="/")
    assert set(params) - set(encoder) == {"head/kernel", "head/bias"}
    np.testing.assert_array_equal(params["head/kernel"], fresh["head/kernel"])
    assert not np.array_equal(params["encoder/block_0/attn/query/kernel"], fresh["encoder/block_0/attn/query/kernel"])


@pytest.mark.parametrize("overrides, message", [
    (dict(init_from__params_key="decoder_embed/x"), "config.init_from.params_key='decoder_embed/x'"),
    (dict(init_from__params_key="", ), "unknown ['decoder/block_0/attn/key/bias'"),
    (dict(init_from__step=7), "no checkpoint at step 7 (found [4])"),
    (dict(model__width=64, model__num_heads=2, model__mlp_dim=64), "shape mismatches ['cls: checkpoint (1, 1, 32) vs model (1, 1, 64)'"),
])
def test_mismatched_checkpoints_are_named(tmp_path, mae_run, overrides, message):
    settings = dict(model__posemb="sincos2d", init_from__workdir=mae_run[0], init_from__params_key="encoder")
    c = quiet(vit_builtin.get_config("runlocal"), **dict(settings, **overrides))
    with pytest.raises(ValueError, match=re.escape(message)):
        Trainer(c, str(tmp_path)).initial_state()


def test_commands_name_a_workdir_that_is_not_a_run_of_their_task(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        ckpt_lib.load_run(str(tmp_path), -1, ("segmentation",), "segment")
    (tmp_path / "config.json").write_text(json.dumps({"task": "classification"}))
    with pytest.raises(ValueError, match="is a run of task 'classification'; maskjax.segment works on runs of "
                                         r"\('segmentation',\)"):
        ckpt_lib.load_run(str(tmp_path), -1, ("segmentation",), "segment")


def test_a_run_saved_before_a_key_existed_loads_with_its_default(tmp_path):
    from maskjax.train.config import base_config

    saved = json.loads(base_config("segmentation", "mask2former").to_json())
    saved["model"]["decoder_layers"] = 3  # a value the run chose
    del saved["model"]["remat_policy"], saved["segmentation"]["reclass_eta"]  # keys added after the run
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = ckpt_lib.load_run_config(str(tmp_path))
    fresh = base_config("segmentation", "mask2former")
    assert config.model.remat_policy == fresh.model.remat_policy
    assert config.segmentation.reclass_eta == fresh.segmentation.reclass_eta
    assert config.model.decoder_layers == 3 and config.model.name == "mask2former"


def test_unrolled_checkpoint_initialises_a_scanned_model(tmp_path, mae_run):
    workdir, mae_params = mae_run
    c = quiet(vit_builtin.get_config("runlocal"), model__posemb="sincos2d", model__scan_layers=True,
              init_from__workdir=workdir, init_from__params_key="encoder")
    params = jax.device_get(Trainer(c, str(tmp_path)).initial_state().params)
    blocks = params["encoder"]["blocks"]
    depth = blocks["attn"]["query"]["kernel"].shape[0]
    assert depth == len([k for k in mae_params["encoder"]["encoder"] if k.startswith("block_")]) > 1
    for i in range(depth):
        np.testing.assert_array_equal(blocks["mlp"]["fc1"]["kernel"][i],
                                      mae_params["encoder"]["encoder"][f"block_{i}"]["mlp"]["fc1"]["kernel"])


def test_a_run_converted_to_the_scanned_layout_resumes_where_it_stopped(tmp_path, mae_run):
    """Resuming with another layout names the conversion; the converted run's next step has the original's loss."""
    from maskjax.convert.scan_layout import convert_run
    from maskjax.train.trainer import ResumeError

    workdir, _ = mae_run
    original = str(tmp_path / "original")
    shutil.copytree(workdir, original)
    settings = dict(total_steps=5, checkpoint_every=5, evals__eval__every=0, optimizer__warmup_steps=1,
                    async_checkpointing=False, log_every=1)
    with pytest.raises(ResumeError, match=r"python -m maskjax.convert.scan_layout --workdir=.*original"):
        Trainer(quiet(mae_builtin.get_config("runlocal"), model__scan_layers=True, **settings), original).run()
    converted = str(tmp_path / "scanned")
    assert convert_run(original, converted) == (4, True)
    state = ckpt_lib.Checkpointer(converted, async_save=False).restore_numpy(4)
    assert state["params"]["encoder"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape[0] > 1
    opt_paths = [ckpt_lib.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]]
    assert any("decoder/blocks/" in p for p in opt_paths)  # the optimizer moments are converted too
    assert not any("/block_" in p for p in opt_paths)
    losses = {}
    for name, scan in ((original, False), (converted, True)):
        Trainer(quiet(mae_builtin.get_config("runlocal"), model__scan_layers=scan, **settings), name).run()
        with open(f"{name}/metrics.jsonl") as f:
            losses[scan] = [r["train/loss"] for r in map(json.loads, f) if r.get("step") == 5 and "train/loss" in r]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


@pytest.mark.parametrize("head, target_key", [("eomt", ""), ("mask2former", "backbone")])
def test_mae_encoder_initialises_a_segmentation_backbone(tmp_path, mae_run, head, target_key):
    """EoMT's parameters are the ViT's plus its own (root); Mask2Former-style nests the ViT under 'backbone'."""
    from configs import eomt_builtin, mask2former_builtin

    workdir, mae_params = mae_run
    get_config = {"eomt": eomt_builtin, "mask2former": mask2former_builtin}[head].get_config
    settings = dict(model__variant="mu/4", model__posemb="sincos2d", evals__eval__every=0)
    c = quiet(get_config("runlocal"), init_from__workdir=workdir, init_from__params_key="encoder",
              init_from__target_key=target_key, **settings)
    params = flax.traverse_util.flatten_dict(jax.device_get(Trainer(c, str(tmp_path)).initial_state().params),
                                             sep="/")
    encoder = flax.traverse_util.flatten_dict(mae_params["encoder"], sep="/")
    prefix = target_key + "/" if target_key else ""
    for key, value in encoder.items():
        np.testing.assert_array_equal(params[prefix + key], value)
    head_keys = [k for k in params if not any(k == prefix + e for e in encoder)]
    assert head_keys and all(not k.startswith(prefix + "encoder/") for k in head_keys)  # only the head is new
    if head == "mask2former":
        with pytest.raises(ValueError, match=re.escape("config.init_from.target_key='backbone/nope': 'nope' is not "
                                                       "in this model's parameters under backbone")):
            bad = quiet(get_config("runlocal"), init_from__workdir=workdir, init_from__params_key="encoder",
                        init_from__target_key="backbone/nope", **settings)
            Trainer(bad, str(tmp_path / "bad")).initial_state()
