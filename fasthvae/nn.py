"""``nn.Module`` wrappers of the fused ops, in the style of ``torch.nn`` losses."""

import torch
from torch import Tensor, nn

from fasthvae import ops
from fasthvae.ops.reference import check_reduction


class GaussianKL(nn.Module):
    """KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)), or to N(0, I) when no prior is passed."""

    def __init__(self, reduction: str = "sample") -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(
        self, mu: Tensor, logvar: Tensor, mu_p: Tensor | None = None, logvar_p: Tensor | None = None
    ) -> Tensor:
        return ops.gaussian_kl(mu, logvar, mu_p, logvar_p, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class Reparameterize(nn.Module):
    """z = mu + exp(logvar / 2) * eps; in eval mode the mean ``mu`` when ``sample_in_eval`` is off."""

    def __init__(self, sample_in_eval: bool = True) -> None:
        super().__init__()
        self.sample_in_eval = sample_in_eval

    def forward(self, mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not self.training and not self.sample_in_eval:
            return mu
        return ops.reparameterize(mu, logvar, generator=generator)


class SampleAndKL(nn.Module):
    """A reparameterized sample and its KL to the prior in one fused pass."""

    def __init__(self, reduction: str = "sample") -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(
        self, mu: Tensor, logvar: Tensor, mu_p: Tensor | None = None, logvar_p: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return ops.sample_and_kl(mu, logvar, mu_p, logvar_p, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
