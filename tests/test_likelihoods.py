"""The discretized logistic mixture: conditionals that are distributions, the single logistic as
its one-component case, and its mean image (the 256^3 normalisation: tests/test_likelihood_ops.py)."""

import pytest
import torch

from fasthvae import likelihoods
from fasthvae.ops.reference import split_mixture


def random_params(k: int, h: int = 1, w: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 10 * k, h, w, generator=g, dtype=torch.float64) * 0.7


def test_each_channel_sums_to_one_given_the_channels_before_it():
    """P(b | r, g) of one component over the 256 blue values, for a few (r, g): the coupling only
    shifts the mean, so every conditional is a distribution."""
    params = random_params(1, seed=3)
    params[:, 7:10] = 2.0  # strong coupling (tanh(2) = 0.96)
    values = torch.arange(256, dtype=torch.float64) / 255
    for red, green in [(0.0, 1.0), (0.3, 0.7), (1.0, 0.5)]:
        x = torch.stack([torch.full_like(values, red), torch.full_like(values, green), values])
        joint = torch.exp(-likelihoods.mixture_nll(x[None, :, :, None], params.expand(-1, -1, 256, 1)))
        blue_sum = joint.sum().item()
        x_rg = torch.tensor([red, green, 0.0], dtype=torch.float64)[None, :, None, None]
        _, means, log_scales, coeffs = split_mixture(params)
        p_r = torch.exp(
            -likelihoods.discretized_logistic_nll(x_rg[:, 0], means[:, 0, 0], log_scales[:, 0, 0])
        )
        g_mean = means[:, 1, 0] + coeffs[:, 0, 0] * (2 * red - 1)
        p_g = torch.exp(-likelihoods.discretized_logistic_nll(x_rg[:, 1], g_mean, log_scales[:, 1, 0]))
        assert blue_sum == pytest.approx((p_r * p_g).item(), rel=1e-4)


def test_one_component_without_coupling_is_the_single_logistic():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 3, 4, 4), generator=g).double() / 255
    means, log_scales = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    params = torch.cat([torch.zeros(2, 1, 4, 4), means, log_scales, torch.zeros(2, 3, 4, 4)], 1).double()
    single = likelihoods.nll("logistic", torch.cat([means, log_scales], 1).double(), x)
    assert torch.allclose(likelihoods.nll("mixture", params, x).double(), single.double(), rtol=1e-6)


def test_mixture_mean_is_the_weighted_mean_of_the_coupled_components():
    params = random_params(2, 3, 3)
    logits, means, _, coeffs = split_mixture(params)
    w = torch.softmax(logits, 1)
    red = means[:, 0]
    green = means[:, 1] + coeffs[:, 0] * red
    expected_green = (w * green).sum(1)
    assert torch.allclose(likelihoods.mixture_mean(params)[:, 1], expected_green)
    image = likelihoods.mean_image("mixture", params)
    assert image.shape == (1, 3, 3, 3) and image.min() >= 0 and image.max() <= 1
    assert likelihoods.out_channels("mixture") == 10 * likelihoods.MIXTURES
