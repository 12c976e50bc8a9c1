"""What the VAE and the HVAE share: the loss, sampling helpers, Gaussian log-densities."""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fasthvae import likelihoods

LOG_2PI = math.log(2 * math.pi)
KL_BALANCE_EPS = 0.01  # nats added to each group's KL before balancing, as NVAE's kl_per_group


@dataclass
class Output:
    """A forward pass: decoder output (likelihood parameters) and KL terms per image, float32 [B]."""

    decoded: Tensor
    kls: dict[str, Tensor]


def gaussian_log_prob(z: Tensor, mu: Tensor | None = None, logvar: Tensor | None = None) -> Tensor:
    """log N(z; mu, e^logvar) summed per sample (N(0, I) when mu, logvar are None), float32 [B]."""
    z = z.float()
    if mu is None or logvar is None:
        per = -0.5 * (z.square() + LOG_2PI)
    else:
        mu, logvar = mu.float(), logvar.float()
        per = -0.5 * ((z - mu).square() * torch.exp(-logvar) + logvar + LOG_2PI)
    return per.flatten(1).sum(1)


def sample_gaussian(mu: Tensor, logvar: Tensor) -> Tensor:
    """Plain PyTorch sample (for evaluation bounds, which need the sample's log-densities)."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class LatentVariableModel(nn.Module):
    """Base of the models: ``forward(x, kl_reduction)`` gives an :class:`Output`; ``kl_levels`` names
    its KLs and the hierarchy level of each (0 the top), whose schedule weight it takes, and
    ``kl_dims`` the latent dimensions behind each. ``analytic_elbo``: reconstruction plus the KLs
    of ``forward`` is an unbiased estimate of the negative ELBO (else evaluation uses
    ``log_weight``)."""

    kl_levels: dict[str, int]
    kl_dims: dict[str, int]
    analytic_elbo: bool = True

    def __init__(self, likelihood: str) -> None:
        super().__init__()
        likelihoods.check_likelihood(likelihood)
        self.likelihood = likelihood

    @property
    def num_levels(self) -> int:
        return max(self.kl_levels.values()) + 1

    def loss(
        self,
        x: Tensor,
        weights: Tensor | list[float],
        free_bits: float = 0.0,
        balance: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        """Mean over the batch of recon + KLs weighted by level (``weights[level]``, the schedule's
        :meth:`~fasthvae.schedules.Schedule.level_weights`), with each term's batch mean (float32).

        ``free_bits`` > 0 (nats per latent dimension): each KL enters the loss as the larger of its
        batch mean and ``free_bits`` times its latent dimensions (free bits, Kingma et al. 2016), so
        a group below its floor gets no KL gradient. ``balance`` in [0, 1] (a tensor, so that a
        compiled loss takes each step's value without recompiling): each KL term is further scaled
        by ``1 + balance * (c - 1)``, ``c`` its :meth:`kl_balance_coefficients`. The terms returned
        stay the plain KLs."""
        out = self(x)
        recon = likelihoods.nll(self.likelihood, out.decoded, x)
        means = {k: kl.mean() for k, kl in out.kls.items()}
        if free_bits or balance is not None:
            scale = dict.fromkeys(means, 1.0)
            if balance is not None:
                scale = {k: 1 + balance * (c - 1) for k, c in self.kl_balance_coefficients(means).items()}
            loss = recon.mean() + sum(
                weights[self.kl_levels[k]]
                * scale[k]
                * (torch.clamp_min(kl, free_bits * self.kl_dims[k]) if free_bits else kl)
                for k, kl in means.items()
            )
        else:
            loss = (recon + sum(weights[self.kl_levels[k]] * kl for k, kl in out.kls.items())).mean()
        return {"loss": loss, "recon": recon.mean(), **means}

    def kl_balance_coefficients(self, kls: dict[str, Tensor]) -> dict[str, Tensor]:
        """KL balancing (NVAE, Vahdat & Kautz 2020): each group's coefficient is proportional to its
        batch-mean KL per latent dimension (plus ``KL_BALANCE_EPS`` nats a group), the coefficients
        averaging 1 over the groups; no gradient flows through them. A group that carries little is
        weighed little, so the KL does not push it the rest of the way to nothing while the others
        learn."""
        per_dim = torch.stack(
            [(kl.detach().float().abs() + KL_BALANCE_EPS) / self.kl_dims[k] for k, kl in kls.items()]
        )
        return dict(zip(kls, per_dim / per_dim.mean(), strict=True))

    @torch.no_grad()
    def elbo(self, x: Tensor) -> Tensor:
        """The evidence lower bound per image [B] (nats, float32; log p(x) >= ELBO) of images in
        [0, 1]: reconstruction plus the analytic KLs where their sum is exact (``analytic_elbo``),
        else one importance weight (an unbiased estimate either way)."""
        if not self.analytic_elbo:
            return self.log_weight(x).float()
        out = self(x)
        nll = likelihoods.nll(self.likelihood, out.decoded, x).float()
        return -(nll + sum(kl.float() for kl in out.kls.values()))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean images [B, 3, H, W] in [0, 1] decoded from a posterior sample."""
        return likelihoods.mean_image(self.likelihood, self(x).decoded)

    def decode_mean(self, decoded: Tensor) -> Tensor:
        return likelihoods.mean_image(self.likelihood, decoded)
