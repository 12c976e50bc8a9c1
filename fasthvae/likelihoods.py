"""Reconstruction likelihoods p(x|z) for images x in [0, 1], each summed per image (nats).

- ``bernoulli``: binary cross-entropy on [0, 1] pixels, the study's "reconstruction loss". It is not a
  likelihood of 8-bit images (the targets are not binary), so it has no bits/dim.
- ``gaussian``: fixed-variance Gaussian, i.e. the summed squared error (sigma^2 = 1/2, constant
  dropped); no bits/dim either (a density, not a probability of discrete pixels).
- ``logistic``: discretized logistic (PixelCNN++-style, one component, 256 bins per sub-pixel, edge
  bins open): a probability of the 8-bit image, so -log p is measured in bits/dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LIKELIHOODS = ("bernoulli", "gaussian", "logistic")
DISCRETE = {"logistic"}
PIXELS_PER_IMAGE = 3 * 32 * 32


def out_channels(likelihood: str) -> int:
    """Decoder output channels: a mean per sub-pixel, and a log-scale for ``logistic``."""
    check_likelihood(likelihood)
    return 6 if likelihood == "logistic" else 3


def check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")


def mean_image(likelihood: str, decoded: Tensor) -> Tensor:
    """The decoder's mean image in [0, 1] (what reconstructions and samples show)."""
    if likelihood == "logistic":
        return (decoded[:, :3].float().clamp(-1, 1) + 1) / 2
    return torch.sigmoid(decoded.float())


def discretized_logistic_nll(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """-log P(x) per element for x in {0, 1/255, ..., 1}, mean in [-1, 1] space, 256 bins."""
    x = x * 2 - 1  # [-1, 1]; bin half-width 1/255
    log_scale = log_scale.clamp(min=-7.0)
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


def nll(likelihood: str, decoded: Tensor, x: Tensor) -> Tensor:
    """-log p(x | z) summed per image, float32, shape [B]."""
    decoded = decoded.float()
    if likelihood == "bernoulli":
        per = F.binary_cross_entropy_with_logits(decoded, x, reduction="none")
    elif likelihood == "gaussian":
        per = (torch.sigmoid(decoded) - x).square()
    elif likelihood == "logistic":
        per = discretized_logistic_nll(x, decoded[:, :3], decoded[:, 3:])
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
