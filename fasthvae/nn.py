"""``nn.Module`` wrappers of the fused ops, in the style of ``torch.nn`` losses, and a stride-1
``Conv2d`` that can run on oneDNN's primitives called directly."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasthvae import ops
from fasthvae.ops import onednn_conv
from fasthvae.ops.activation import fused_gelu_runs
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


def _on_onednn(x: Tensor, onednn: bool) -> bool:
    """Whether a convolution of ``x`` runs on ``fasthvae_onednn``: asked for (``onednn``), and ``x``
    a float32 or bfloat16 CPU tensor (float32 also under CPU autocast)."""
    return onednn and x.device.type == "cpu" and x.dtype in onednn_conv.DTYPES


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    onednn: bool = False,
) -> Tensor:
    """``F.conv2d`` at stride 1; on ``fasthvae_onednn`` (:mod:`fasthvae.ops.onednn_conv`) where
    :func:`_on_onednn`."""
    if _on_onednn(x, onednn):
        return onednn_conv.conv2d(x, weight, bias, padding, groups)
    return F.conv2d(x, weight, bias, padding=padding, groups=groups)


def gelu_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    onednn: bool = False,
) -> Tensor:
    """``conv2d(F.gelu(x), ...)``: one ``fasthvae_onednn::gelu_conv2d`` call (the fused GELU written
    in the convolution's dtype) when ``onednn`` is set and both the oneDNN convolution and the fused
    GELU run on ``x``; else :func:`conv2d` of :func:`conv_input_gelu`."""
    if _on_onednn(x, onednn) and fused_gelu_runs(x):
        return onednn_conv.gelu_conv2d(x, weight, bias, padding, groups)
    return conv2d(conv_input_gelu(x, onednn), weight, bias, padding, groups, onednn)


def conv_input_gelu(x: Tensor, fused: bool = False) -> Tensor:
    """``F.gelu(x)`` as a convolution's input; :func:`fasthvae.ops.gelu` (its derivative kept for
    the backward) when ``fused``."""
    return ops.gelu(x) if fused else F.gelu(x)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` at stride 1 (the same parameters and state dict) whose convolution runs on
    ``fasthvae_onednn`` when ``onednn`` is set (:func:`use_onednn_conv`); ``conv(x, gelu_input=True)``
    convolves ``F.gelu(x)`` (:func:`gelu_conv2d`: one op with ``onednn``)."""

    onednn = False

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int, padding: int = 0, groups: int = 1, bias: bool = True
    ) -> None:
        super().__init__(c_in, c_out, kernel_size, padding=padding, groups=groups, bias=bias)

    def forward(self, x: Tensor, gelu_input: bool = False) -> Tensor:
        if gelu_input:
            return gelu_conv2d(x, self.weight, self.bias, self.padding, self.groups, self.onednn)
        return conv2d(x, self.weight, self.bias, self.padding, self.groups, self.onednn)


def use_onednn_conv(model: nn.Module, on: bool = True) -> int:
    """Run the convolutions of ``model``'s modules that offer it (an ``onednn`` attribute:
    :class:`Conv2d`, and models whose own convolution calls read it) on ``fasthvae_onednn``, and
    the GELUs before them as :func:`conv_input_gelu` with ``fused`` set, or (``on=False``) both on
    ATen. Loads the op first (before ``torch.compile`` traces the model). The number of modules
    switched."""
    switched = [m for m in model.modules() if hasattr(m, "onednn")]
    if on and switched:
        onednn_conv.load()
    for module in switched:
        module.onednn = on
    return len(switched)
