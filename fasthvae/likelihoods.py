"""Reconstruction likelihoods p(x|z) for images x in [0, 1], each summed per image (nats).

- ``bernoulli``: binary cross-entropy on [0, 1] pixels, the study's "reconstruction loss". It is not a
  likelihood of 8-bit images (the targets are not binary), so it has no bits/dim.
- ``gaussian``: fixed-variance Gaussian, i.e. the summed squared error (sigma^2 = 1/2, constant
  dropped); no bits/dim either (a density, not a probability of discrete pixels).
- ``logistic``: discretized logistic (PixelCNN++-style, one component, 256 bins per sub-pixel, edge
  bins open): a probability of the 8-bit image, so -log p is measured in bits/dim.
- ``mixture``: discretized mixture of ``MIXTURES`` logistics per pixel (PixelCNN++ / VDVAE): each
  component has a mean and log-scale per channel and couples the channels linearly (the green mean
  shifts with red, blue with red and green), so it models the RGB triple jointly; bits/dim as above.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LIKELIHOODS = ("bernoulli", "gaussian", "logistic", "mixture")
DISCRETE = {"logistic", "mixture"}
PIXELS_PER_IMAGE = 3 * 32 * 32
MIXTURES = 10  # components of ``mixture`` (PixelCNN++ and VDVAE use 10 on CIFAR-10)
MIN_LOG_SCALE = -7.0


def out_channels(likelihood: str) -> int:
    """Decoder output channels: a mean per sub-pixel; a log-scale too for ``logistic``; per mixture
    component a logit, 3 means, 3 log-scales and 3 channel coefficients for ``mixture``."""
    check_likelihood(likelihood)
    return {"logistic": 6, "mixture": 10 * MIXTURES}.get(likelihood, 3)


def check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")


def mean_image(likelihood: str, decoded: Tensor) -> Tensor:
    """The decoder's mean image in [0, 1] (what reconstructions and samples show)."""
    if likelihood == "logistic":
        return (decoded[:, :3].float().clamp(-1, 1) + 1) / 2
    if likelihood == "mixture":
        return (mixture_mean(decoded.float()).clamp(-1, 1) + 1) / 2
    return torch.sigmoid(decoded.float())


def discretized_logistic_nll(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """-log P(x) per element for x in {0, 1/255, ..., 1}, mean in [-1, 1] space, 256 bins."""
    x = x * 2 - 1  # [-1, 1]; bin half-width 1/255
    log_scale = log_scale.clamp(min=MIN_LOG_SCALE)
    centered = x - mean
    inv_s = torch.exp(-log_scale)
    plus = inv_s * (centered + 1 / 255)
    minus = inv_s * (centered - 1 / 255)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus), for the x = 0 bin
    log_one_minus_cdf_minus = -F.softplus(minus)  # log (1 - sigmoid(minus)), for the x = 255 bin
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = minus + 1 / 255 * inv_s  # the bin centre, for the density approximation when delta is tiny
    log_pdf_mid = mid - log_scale - 2 * F.softplus(mid) - math.log(127.5)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
    log_p = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_mid))
    return -log_p


def split_mixture(params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``mixture`` decoder output [B, 10K, H, W] -> (logits [B, K, H, W], means, log-scales and
    channel coefficients, each [B, 3, K, H, W]); coefficients in (-1, 1) by tanh."""
    b, c, h, w = params.shape
    k = c // 10
    logits = params[:, :k]
    means, log_scales, coeffs = params[:, k:].reshape(b, 3, 3, k, h, w).unbind(1)
    return logits, means, log_scales, torch.tanh(coeffs)


def _coupled_means(means: Tensor, coeffs: Tensor, red: Tensor, green: Tensor) -> Tensor:
    """Each component's channel means given red and green values ([-1, 1] space): [B, 3, K, H, W]."""
    m_r, m_g, m_b = means.unbind(1)
    a, b, c = coeffs.unbind(1)
    return torch.stack([m_r, m_g + a * red, m_b + b * red + c * green], 1)


def mixture_nll(x: Tensor, params: Tensor) -> Tensor:
    """-log P(x) per pixel [B, H, W] of the discretized logistic mixture, x in {0, 1/255, ..., 1}."""
    logits, means, log_scales, coeffs = split_mixture(params)
    x2 = (x * 2 - 1).unsqueeze(2)  # [B, 3, 1, H, W]
    mean = _coupled_means(means, coeffs, x2[:, 0], x2[:, 1])
    log_p_channels = -discretized_logistic_nll(x.unsqueeze(2), mean, log_scales).sum(1)  # [B, K, H, W]
    return -torch.logsumexp(log_p_channels + F.log_softmax(logits, 1), 1)


def mixture_mean(params: Tensor) -> Tensor:
    """The mean image of the (continuous) mixture in [-1, 1] space: [B, 3, H, W]."""
    logits, means, _, coeffs = split_mixture(params)
    red = means[:, 0]
    green = means[:, 1] + coeffs[:, 0] * red
    blue = means[:, 2] + coeffs[:, 1] * red + coeffs[:, 2] * green
    weights = torch.softmax(logits, 1)
    return torch.stack([(weights * m).sum(1) for m in (red, green, blue)], 1)


def nll(likelihood: str, decoded: Tensor, x: Tensor) -> Tensor:
    """-log p(x | z) summed per image, float32, shape [B]."""
    decoded = decoded.float()
    if likelihood == "bernoulli":
        per = F.binary_cross_entropy_with_logits(decoded, x, reduction="none")
    elif likelihood == "gaussian":
        per = (torch.sigmoid(decoded) - x).square()
    elif likelihood == "logistic":
        per = discretized_logistic_nll(x, decoded[:, :3], decoded[:, 3:])
    elif likelihood == "mixture":
        per = mixture_nll(x, decoded)
    else:
        check_likelihood(likelihood)
    return per.flatten(1).sum(1)


def image_errors(mean: Tensor, x: Tensor) -> dict[str, Tensor]:
    """BCE and squared error of a mean image in [0, 1] against x, summed per image: [B] each."""
    mean = mean.float().clamp(1e-6, 1 - 1e-6)
    bce = F.binary_cross_entropy(mean, x, reduction="none").flatten(1).sum(1)
    mse = (mean - x).square().flatten(1).sum(1)
    return {"recon_bce": bce, "recon_mse": mse}


def bits_per_dim(nats: Tensor | float, dims: int = PIXELS_PER_IMAGE) -> Tensor | float:
    """Nats per image -> bits per dimension: nats / (dims ln 2)."""
    return nats / (dims * math.log(2))
