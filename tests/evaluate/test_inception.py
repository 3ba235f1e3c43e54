"""maskjax's FID Inception against pytorch-fid's `InceptionV3` (a test dependency) at random weights: the same 2048-d
pool features from the same state dict."""

import numpy as np
import pytest

from maskjax.convert._torch_compat import import_torch
from maskjax.evaluate.inception import fid_inception_features, fid_inception_from_state_dict, load_fid_inception


torch = import_torch()  # declares the op schema PyPI torchvision's import needs (see maskjax/convert/_torch_compat.py)


def _random_pytorch_fid_inception(monkeypatch):
    """(pytorch-fid's network, the torchvision Inception3 it was built from) with random weights and BatchNorm
    statistics. Its constructor would download the weights: the download and the load are patched out."""
    import torchvision
    from pytorch_fid import inception
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
    monkeypatch.setattr(torchvision.models.inception.Inception3, "load_state_dict",
                        lambda self, state, *args, **kwargs: None)
    built = []
    original = inception.fid_inception_v3
    monkeypatch.setattr(inception, "fid_inception_v3", lambda: built.append(original()) or built[-1])
    torch.manual_seed(0)
    model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model, built[0]


def test_features_match_pytorch_fid(monkeypatch, tmp_path):
    model, torchvision_inception = _random_pytorch_fid_inception(monkeypatch)
    images01 = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images01)[0][:, :, 0, 0].numpy()
    # The weights file has torchvision's layer names (plus the unused 1008-way fc); written here as safetensors.
    from safetensors.torch import save_file
    path = tmp_path / "fid_inception.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision_inception.state_dict().items()}, str(path))
    got = np.asarray(fid_inception_features(load_fid_inception(path), images01.permute(0, 2, 3, 1).numpy() * 2 - 1))
    assert got.shape == (2, 2048)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    # pytorch-fid's own state dict (layers under blocks.N.M) reads the same.
    again = fid_inception_from_state_dict(model.state_dict())
    np.testing.assert_array_equal(again["Mixed_7c.branch_pool"]["kernel"],
                                  load_fid_inception(path)["Mixed_7c.branch_pool"]["kernel"])


def test_missing_weights_are_named():
    with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight"):
        fid_inception_from_state_dict({})
    with pytest.raises(ValueError, match="does not exist"):
        load_fid_inception("/nonexistent/pt_inception.pth")
    with pytest.raises(ValueError, match=r"images \[B, H, W, 1 or 3\]"):
        fid_inception_features({}, np.zeros((2, 8, 8, 2), np.float32))
