"""Video (VideoMAE-style tubelets): patchify against a numpy loop, the tubelet embedding against an explicit
per-token matrix product, the space-time position embedding against its formula, and an MAE on tube-masked clips
whose predictions never see the masked tubes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax import masking
from maskjax.models.layers import PatchEmbed, posemb_sincos_2d, posemb_sincos_3d
from maskjax.models.mae import MAE, patchify, unpatchify
from maskjax.models.vit import ViT

T, H, W, C, TUBE, PATCH = 4, 8, 12, 3, 2, 4  # grid (2, 2, 3): 12 tokens


def clips(n=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, T, H, W, C)).astype(np.float32)


def test_video_patchify_matches_a_numpy_loop_and_inverts():
    x = clips()
    got = np.asarray(patchify(jnp.asarray(x), PATCH, TUBE))
    gt, gh, gw = T // TUBE, H // PATCH, W // PATCH
    assert got.shape == (2, gt * gh * gw, TUBE * PATCH * PATCH * C)
    for b in range(2):
        for t in range(gt):
            for r in range(gh):
                for c in range(gw):
                    tubelet = x[b, t * TUBE:(t + 1) * TUBE, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
                    np.testing.assert_array_equal(got[b, (t * gh + r) * gw + c], tubelet.reshape(-1))
    back = unpatchify(jnp.asarray(got), PATCH, (gt, gh, gw), C, tubelet_size=TUBE)
    np.testing.assert_array_equal(np.asarray(back), x)
    with pytest.raises(ValueError, match="tubelet_size"):
        patchify(jnp.asarray(x), PATCH)  # a video needs its tubelet size


def test_tubelet_embedding_is_a_linear_map_of_each_tubelet():
    x = clips()
    embed = PatchEmbed(width=16, patch_size=PATCH, tubelet_size=TUBE)
    params = nn.meta.unbox(embed.init(jax.random.key(0), x))["params"]
    got = np.asarray(embed.apply({"params": params}, x))
    kernel = np.asarray(params["conv"]["kernel"], np.float64).reshape(-1, 16)  # (t, row, col, channel) x width
    want = np.asarray(patchify(jnp.asarray(x), PATCH, TUBE), np.float64) @ kernel + np.asarray(params["conv"]["bias"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_space_time_posemb_is_spatial_plus_a_temporal_sincos():
    t, h, w, width = 3, 2, 4, 16
    got = np.asarray(posemb_sincos_3d(t, h, w, width))[0].reshape(t, h * w, width)
    space = np.asarray(posemb_sincos_2d(h, w, width))[0]
    omega = 1.0 / 10_000 ** (np.arange(width // 2) / (width // 2))
    for frame in range(t):
        time = np.concatenate([np.sin(frame * omega), np.cos(frame * omega) - 1.0])
        np.testing.assert_allclose(got[frame], space + time[None], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(posemb_sincos_3d(1, h, w, width)), np.asarray(posemb_sincos_2d(h, w, width)),
                               atol=1e-7)


def video_encoder(**kw):
    return ViT(num_classes=None, patch_size=PATCH, tubelet_size=TUBE, width=32, depth=2, mlp_dim=64, num_heads=2,
               posemb="sincos2d", **kw)


def test_mae_on_tube_masked_clips_ignores_the_masked_tubes():
    x = clips()
    model = MAE(encoder=video_encoder(), decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64)
    result = masking.tube_masking(jax.random.key(1), 2, (T // TUBE, H // PATCH, W // PATCH), 0.5)
    params = nn.meta.unbox(model.init(jax.random.key(0), x, result))["params"]
    pred, aux = model.apply({"params": params}, x, result)
    assert pred.shape == (2, 12, TUBE * PATCH * PATCH * C)
    assert aux["encoded"].shape == (2, 1 + 6, 32)  # cls + the 6 visible tokens (3 per frame pair, tubes)
    mask = np.asarray(result.mask)
    np.testing.assert_array_equal(mask.reshape(2, 2, 6)[:, 0], mask.reshape(2, 2, 6)[:, 1])  # one spatial mask
    # change every masked tubelet's pixels: predictions must not move
    patches = np.asarray(patchify(jnp.asarray(x), PATCH, TUBE))
    noisy = np.where(mask[..., None], np.random.default_rng(5).normal(size=patches.shape), patches)
    x2 = np.asarray(unpatchify(jnp.asarray(noisy, jnp.float32), PATCH, (2, 2, 3), C, tubelet_size=TUBE))
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x2, result)[0]), np.asarray(pred),
                               rtol=1e-5, atol=1e-5)


def test_video_vit_refuses_images_and_learned_posemb():
    enc = video_encoder()
    with pytest.raises(ValueError, match=r"videos must be \[batch, T, H, W, C\]"):
        enc.init(jax.random.key(0), jnp.zeros((1, H, W, C)))
    with pytest.raises(ValueError, match="needs posemb='sincos2d'"):
        ViT(patch_size=PATCH, tubelet_size=TUBE, posemb="learn").init(jax.random.key(0), jnp.zeros((1, T, H, W, C)))
    with pytest.raises(ValueError, match="T divisible by tubelet_size=2"):
        enc.init(jax.random.key(0), jnp.zeros((1, 3, H, W, C)))


# ---------------------------------------------------------------------------------------------- data and training
def test_clips_are_panning_views_of_the_builtin_images():
    from maskjax.data.builtin import BuiltinShapes
    from maskjax.data.clips import ShapeClips

    clips_source = ShapeClips("validation", num_frames=5, image_size=32, max_speed=2)
    images_source = BuiltinShapes("validation", image_size=32)
    batch = clips_source.get_batch([3, 7])
    for row, index in enumerate((3, 7)):
        clip, image = clips_source[index], images_source[index]
        vy, vx = clips_source.velocity(index)
        assert abs(vy) <= 2 and abs(vx) <= 2
        assert clip["image"].shape == (5, 32, 32, 3) and clip["label"] == image["label"]
        for t in range(5):
            np.testing.assert_array_equal(clip["image"][t], np.roll(image["image"], (t * vy, t * vx), axis=(0, 1)))
        np.testing.assert_array_equal(batch["image"][row], clip["image"])
    speeds = {clips_source.velocity(i) for i in range(50)}
    assert len(speeds) > 5  # clips move in different directions


def test_clip_augmentation_moves_every_frame_alike():
    from maskjax.data.preprocess import random_crop_flip

    clip = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    for seed in range(4):
        got = random_crop_flip({"image": clip}, np.random.default_rng(seed))["image"]
        for t in range(3):  # each frame alone, with the same draws
            want = random_crop_flip({"image": clip[t]}, np.random.default_rng(seed))["image"]
            np.testing.assert_array_equal(got[t], want)


def test_videomae_config_trains_and_bad_video_settings_are_named(tmp_path):
    import json
    import os
    import re

    from configs import videomae_builtin
    from maskjax.train import config as config_lib
    from maskjax.train.trainer import Trainer
    from tests.configs import override

    c = videomae_builtin.get_config("runlocal")
    c = override(c, progress_bar=False, total_steps=4, evals__eval__every=4, checkpoint_every=4, log_every=1,
                 evals__probe__every=-1, data__num_threads=0, evals__reconstructions__count=2,
                 async_checkpointing=False)
    result = Trainer(c, str(tmp_path)).run()
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    assert result.step == 4 and np.isfinite(result.eval_metrics["eval/psnr"])
    assert os.listdir(os.path.join(tmp_path, "images"))
    for overrides, message in [(dict(data__name="builtin_shapes"), "data.num_frames=4"),
                               (dict(model__tubelet_size=3), "data.num_frames=4: must be a multiple"),
                               (dict(model__tubelet_size=0), "model.tubelet_size=0"),
                               (dict(mim__target="hog"), "mim.target='hog'")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            config_lib.validate(override(videomae_builtin.get_config("runlocal"), **overrides), num_devices=1)
