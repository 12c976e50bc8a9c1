"""The standard VAE: convolutional encoder to q(z|x), reparameterized sample, convolutional decoder,
prior N(0, I). Loss: recon + beta * KL(q(z|x) || N(0, I))."""

from typing import ClassVar

import torch
from torch import Tensor, nn

from fasthvae import likelihoods, ops
from fasthvae.models.base import LatentVariableModel, Output, gaussian_log_prob, sample_gaussian
from fasthvae.models.blocks import GaussianHead, decoder_trunk, encoder_trunk

LEVELS = 3  # 32 -> 4


class VAE(LatentVariableModel):
    """``channels``: width of the first conv (doubling at each of 3 downsamplings); ``latent``: dim of z."""

    kl_levels: ClassVar[dict[str, int]] = {"kl_z": 0}

    def __init__(self, channels: int = 32, latent: int = 128, likelihood: str = "bernoulli") -> None:
        super().__init__(likelihood)
        self.latent = latent
        self.kl_dims = {"kl_z": latent}
        self.width = channels * 2**LEVELS
        self.encoder = encoder_trunk(channels, LEVELS)
        self.posterior = GaussianHead(nn.Linear(self.width * 16, 2 * latent))
        self.project = nn.Linear(latent, self.width * 16)
        self.decoder = decoder_trunk(self.width, channels, LEVELS, likelihoods.out_channels(likelihood))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.posterior(self.encoder(x).flatten(1))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.project(z).view(-1, self.width, 4, 4))

    def forward(self, x: Tensor, kl_reduction: str = "sample") -> Output:
        mu, logvar = self.encode(x)
        z, kl = ops.sample_and_kl(mu, logvar, reduction=kl_reduction)
        return Output(self.decode(z), {"kl_z": kl})

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """Mean images of z ~ N(0, T^2 I)."""
        z = temperature * torch.randn(n, self.latent, device=self.project.weight.device)
        return self.decode_mean(self.decode(z.to(self.project.weight.dtype)))

    @torch.no_grad()
    def log_weight(self, x: Tensor) -> Tensor:
        """One importance weight log p(x, z) - log q(z | x), z ~ q(z | x): float32 [B]."""
        mu, logvar = self.encode(x)
        z = sample_gaussian(mu, logvar)
        log_px = -likelihoods.nll(self.likelihood, self.decode(z), x)
        return log_px + gaussian_log_prob(z) - gaussian_log_prob(z, mu, logvar)
