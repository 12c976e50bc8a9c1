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

from fasthvae import ops
from fasthvae.ops.reference import split_mixture

LIKELIHOODS = ("bernoulli", "gaussian", "logistic", "mixture")
DISCRETE = {"logistic", "mixture"}
PIXELS_PER_IMAGE = 3 * 32 * 32
MIXTURES = 10  # components of ``mixture`` (PixelCNN++ and VDVAE use 10 on CIFAR-10)


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
    """-log P(x) per element, x in {0, 1/255, ..., 1}, mean in [-1, 1] space (the fused
    :func:`fasthvae.ops.logistic_nll`)."""
    return ops.logistic_nll(x, mean, log_scale, reduction="none")


def mixture_nll(x: Tensor, params: Tensor) -> Tensor:
    """-log P(x) per pixel [B, H, W] of the discretized logistic mixture (the fused
    :func:`fasthvae.ops.mixture_nll`)."""
    return ops.mixture_nll(x, params, reduction="none")


def mixture_mean(params: Tensor) -> Tensor:
    """The mean image of the (continuous) mixture in [-1, 1] space: [B, 3, H, W]."""
    logits, means, _, coeffs = split_mixture(params)
    red = means[:, 0]
    green = means[:, 1] + coeffs[:, 0] * red
    blue = means[:, 2] + coeffs[:, 1] * red + coeffs[:, 2] * green
    weights = torch.softmax(logits, 1)
    return torch.stack([(weights * m).sum(1) for m in (red, green, blue)], 1)


def nll(likelihood: str, decoded: Tensor, x: Tensor) -> Tensor:
    """-log p(x | z) summed per image, float32, shape [B]. The discrete likelihoods run the fused
    ops (:mod:`fasthvae.ops`), which read ``decoded`` in its own dtype and layout; the mixture's in
    one pass for the forward and the backward where ``decoded`` needs a gradient (``one_pass``:
    the decoder's output is then not kept for the backward, its gradient is)."""
    if likelihood == "logistic":
        return ops.logistic_nll(x, decoded[:, :3], decoded[:, 3:])
    if likelihood == "mixture":
        return ops.mixture_nll(x, decoded, one_pass=True)
    decoded = decoded.float()
    if likelihood == "bernoulli":
        per = F.binary_cross_entropy_with_logits(decoded, x, reduction="none")
    elif likelihood == "gaussian":
        per = (torch.sigmoid(decoded) - x).square()
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
