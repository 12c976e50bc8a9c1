"""The study's two-level HVAE.

Inference: x -> q(z1 | x) (a conv latent) -> q(z2 | z1) (a vector). A learned, context-dependent
prior p(z1 | z2) has its own mean and log-variance. Training decodes the encoder's z1; the learned
prior enters only through the loss:

    recon(x | z1) + alpha * KL(q(z1 | x) || p(z1 | z2)) + beta * KL(q(z2 | z1) || N(0, I))

Generation: z2 ~ N(0, I), z1 ~ p(z1 | z2), decode z1.
"""

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from fasthvae import likelihoods, ops
from fasthvae.models.base import LatentVariableModel, Output, gaussian_log_prob, sample_gaussian
from fasthvae.models.blocks import GaussianHead, conv_block, decoder_trunk, encoder_trunk, up_block

LEVELS = 2  # z1 lives at 8x8


class HVAE(LatentVariableModel):
    """``channels``: first conv width; ``z1_channels``: channels of z1 (8x8); ``latent``: dim of z2."""

    kl_levels: ClassVar[dict[str, int]] = {"kl_z1": 1, "kl_z2": 0}  # weights: alpha on z1, beta on z2
    analytic_elbo = False  # z2 depends on z1 under q: see fasthvae.eval.metrics

    def __init__(
        self, channels: int = 32, latent: int = 128, z1_channels: int = 16, likelihood: str = "bernoulli"
    ) -> None:
        super().__init__(likelihood)
        self.latent, self.z1_channels = latent, z1_channels
        self.kl_dims = {"kl_z1": z1_channels * 8 * 8, "kl_z2": latent}
        width = channels * 2**LEVELS
        self.width = width
        self.encoder = encoder_trunk(channels, LEVELS)
        self.posterior_z1 = GaussianHead(nn.Conv2d(width, 2 * z1_channels, 1))
        self.encoder_z2 = nn.Sequential(conv_block(z1_channels, width), conv_block(width, width, stride=2))
        self.posterior_z2 = GaussianHead(nn.Linear(width * 16, 2 * latent))
        self.prior_project = nn.Linear(latent, width * 16)
        self.prior_z1 = nn.Sequential(
            up_block(width, width), GaussianHead(nn.Conv2d(width, 2 * z1_channels, 1))
        )
        self.decoder = decoder_trunk(z1_channels, channels, LEVELS, likelihoods.out_channels(likelihood))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z1 | x): (mu, logvar), each [B, z1_channels, 8, 8]."""
        return self.posterior_z1(self.encoder(x))

    def encode_z2(self, z1: Tensor) -> tuple[Tensor, Tensor]:
        """q(z2 | z1): (mu, logvar), each [B, latent]."""
        return self.posterior_z2(self.encoder_z2(z1).flatten(1))

    def prior(self, z2: Tensor) -> tuple[Tensor, Tensor]:
        """The learned prior p(z1 | z2): (mu, logvar), each [B, z1_channels, 8, 8]."""
        return self.prior_z1(self.prior_project(z2).view(-1, self.width, 4, 4))

    def forward(self, x: Tensor, kl_reduction: str = "sample") -> Output:
        mu1, logvar1 = self.encode(x)
        z1 = ops.reparameterize(mu1, logvar1)
        mu2, logvar2 = self.encode_z2(z1)
        z2, kl2 = ops.sample_and_kl(mu2, logvar2, reduction=kl_reduction)
        mu_p, logvar_p = self.prior(z2)
        kl1 = ops.gaussian_kl(mu1, logvar1, mu_p, logvar_p, reduction=kl_reduction)
        return Output(self.decoder(z1), {"kl_z1": kl1, "kl_z2": kl2})

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """Mean images of z2 ~ N(0, T^2 I), z1 ~ p(z1 | z2) with its standard deviation times T."""
        weight = self.prior_project.weight
        z2 = temperature * torch.randn(n, self.latent, device=weight.device, dtype=weight.dtype)
        mu_p, logvar_p = self.prior(z2)
        z1 = mu_p if temperature == 0 else ops.reparameterize(mu_p, logvar_p + 2 * math.log(temperature))
        return self.decode_mean(self.decoder(z1))

    @torch.no_grad()
    def log_weight(self, x: Tensor) -> Tensor:
        """One importance weight log p(x, z1, z2) - log q(z1, z2 | x): float32 [B]."""
        mu1, logvar1 = self.encode(x)
        z1 = sample_gaussian(mu1, logvar1)
        mu2, logvar2 = self.encode_z2(z1)
        z2 = sample_gaussian(mu2, logvar2)
        mu_p, logvar_p = self.prior(z2)
        log_px = -likelihoods.nll(self.likelihood, self.decoder(z1), x)
        log_p = gaussian_log_prob(z1, mu_p, logvar_p) + gaussian_log_prob(z2)
        log_q = gaussian_log_prob(z1, mu1, logvar1) + gaussian_log_prob(z2, mu2, logvar2)
        return log_px + log_p - log_q
