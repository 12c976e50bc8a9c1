"""A deep top-down hierarchical VAE with convolutional latents at several resolutions.

The study's next step, built after VDVAE (Child, 2021) and NVAE (Vahdat & Kautz, 2020):

- A bottom-up encoder of residual bottleneck cells keeps its activation at every resolution the
  decoder uses.
- A top-down decoder starts from a learned constant at the coarsest resolution and runs latent
  groups from the top (coarsest) down. Group i has a learned prior p(z_i | z_<i) computed from the
  top-down state h, and a posterior q(z_i | z_<i, x) computed from h and the encoder's activation at
  that resolution. Its sample and KL are one fused ``fasthvae.ops.sample_and_kl`` call; h then takes
  the prior's features and the projected z and goes through a residual cell.
- Generation samples each group from its prior (its standard deviation times a temperature).

The layout is one string of top-down blocks: ``"RxN"`` = N latent groups at resolution R x R,
``"RdN"`` = N residual cells without a latent (NVAE's post-process cells), for example
``"1x1,4x2,8x3,16x3,32x2"`` or ``"1x1,4x3,8x6,16x2,32d1"``; the resolutions rise to the image size
(32), upsampling by nearest neighbour between them. Log-variances are soft-clamped to
(-LOGVAR_BOUND, LOGVAR_BOUND), so exp(+-logvar / 2) stays finite in fp16 and bf16.

The posterior is ``absolute`` (its cell outputs q's mean and log-variance) or ``residual`` (NVAE's
residual normal: its cell outputs offsets from the prior's, mu_q = mu_p + dmu and
logvar_q = logvar_p + dlogvar, so q follows p as the prior moves and the KL depends on the offsets
only: 0.5 (dmu^2 / sigma_p^2 + e^dlogvar - 1 - dlogvar)).

Reconstruction plus the analytic KLs (each with z_<i drawn from q) is an unbiased estimate of the
negative ELBO: the KL of group i is the expectation over z_i given the very z_<i that later groups
condition on.
"""

from __future__ import annotations  # the walk's nested functions are traced by dynamo: no evaluated hints

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasthvae import likelihoods, ops
from fasthvae.models.base import LatentVariableModel, Output, gaussian_log_prob, sample_gaussian
from fasthvae.nn import Conv2d, gelu_conv2d

IMAGE_SIZE = 32
LOGVAR_BOUND = 10.0  # sigma in (e^-5, e^5), as NVAE's soft clamp of log sigma at 5
POSTERIORS = ("absolute", "residual")
_TOKEN = re.compile(r"^(\d+)([xd])(\d+)$")


@dataclass(frozen=True)
class DeepSpec:
    """The deep model's size: ``layout`` (top-down groups), ``width`` (channels of the residual
    stream), ``zdim`` (channels per latent group), ``encoder_blocks`` (residual cells per resolution
    in the bottom-up pass), ``bottleneck`` (a cell's inner width / width) and ``posterior``
    (``absolute`` or ``residual``: see the module's docstring)."""

    layout: str
    width: int
    zdim: int
    encoder_blocks: int
    bottleneck: float = 0.25
    posterior: str = "absolute"

    def __post_init__(self) -> None:
        parse_layout(self.layout)
        for name in ("width", "zdim", "encoder_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"deep model: {name} must be positive, got {getattr(self, name)}")
        if not 0 < self.bottleneck <= 1:
            raise ValueError(f"deep model: bottleneck must be in (0, 1], got {self.bottleneck}")
        if self.posterior not in POSTERIORS:
            raise ValueError(
                f"deep model: posterior must be one of {', '.join(POSTERIORS)}, got {self.posterior!r}"
            )


def parse_blocks(layout: str) -> list[tuple[int, bool]]:
    """``"1x1,4x2,...,32d1"`` -> (resolution, has a latent) of each top-down block, top first; a
    clear error when malformed."""
    blocks: list[tuple[int, bool]] = []
    previous = 0
    for token in layout.replace(" ", "").split(","):
        match = _TOKEN.match(token)
        if not match:
            raise ValueError(
                f"deep layout {layout!r}: {token!r} is not RxN (N latent groups at resolution R) "
                "or RdN (N cells without a latent)"
            )
        res, latent, count = int(match[1]), match[2] == "x", int(match[3])
        if res not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"deep layout {layout!r}: resolution {res} must be one of 1, 2, 4, 8, 16, 32")
        if res <= previous:
            raise ValueError(
                f"deep layout {layout!r}: resolutions must rise from the top (got {res} after {previous})"
            )
        if count < 1:
            raise ValueError(f"deep layout {layout!r}: {token} has no block")
        blocks += [(res, latent)] * count
        previous = res
    if previous != IMAGE_SIZE:
        raise ValueError(f"deep layout {layout!r}: the last resolution must be {IMAGE_SIZE} (the image size)")
    if not any(latent for _, latent in blocks):
        raise ValueError(f"deep layout {layout!r}: it has no latent group (RxN)")
    return blocks


def parse_layout(layout: str) -> list[int]:
    """The resolution of each latent group, top first."""
    return [res for res, latent in parse_blocks(layout) if latent]


PRESETS = {
    # 0.32 M parameters, 14 groups, latents up to 16x16 and one cell without a latent at 32x32;
    # trains on a 2-core CPU (see README, "The deep HVAE").
    "small": DeepSpec("1x2,4x4,8x6,16x2,32d1", width=64, zdim=8, encoder_blocks=1),
    # ~37 M parameters, 47 groups, VDVAE-like depth for a GPU.
    "base": DeepSpec("1x2,4x4,8x8,16x16,32x17", width=384, zdim=16, encoder_blocks=3),
}


def soft_clamp(x: Tensor, bound: float = LOGVAR_BOUND) -> Tensor:
    """bound * tanh(x / bound): the identity near 0, smoothly bounded by +-bound."""
    return bound * torch.tanh(x / bound)


Gaussian = tuple[Tensor, Tensor]  # (mu, logvar)


def posterior_from(outputs: Gaussian, prior: Gaussian, kind: str) -> Gaussian:
    """q's (mu, logvar) from its cell's two outputs: themselves (``absolute``) or offsets from the
    prior's (``residual``); the log-variance soft-clamped once."""
    mu, logvar = outputs
    if kind == "residual":
        mu, logvar = prior[0] + mu, prior[1] + logvar
    return mu, soft_clamp(logvar)


# How a latent group draws its z in a top-down walk: (group, prior, posterior or None) -> z.
Draw = Callable[["LatentGroup", Gaussian, Gaussian | None], Tensor]


def upsample_nearest(h: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upsampling by an integer ``factor``, in ``h``'s own memory format: each
    pixel broadcast to a factor x factor block and laid out as ``h`` is (channels_last stays
    channels_last, where ``F.interpolate`` on CPU copies it to NCHW and back), so the backward pass
    is a sum over the blocks instead of a scatter-add."""
    b, c, height, width = h.shape
    if h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous():
        nhwc = h.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(b, height, factor, width, factor, c)
        return nhwc.reshape(b, height * factor, width * factor, c).permute(0, 3, 1, 2)
    blocks = h[:, :, :, None, :, None].expand(b, c, height, factor, width, factor)
    return blocks.reshape(b, c, height * factor, width * factor)


class Cell(nn.Module):
    """A residual bottleneck cell: GELU, 1x1 conv to ``mid``, two 3x3 convs (1x1 below 3x3
    resolution), 1x1 conv to ``c_out``, each after a GELU; added to the input when shapes allow.
    The last conv is scaled by ``out_scale`` (0 gives a cell that starts as the identity / zero)."""

    def __init__(self, c_in: int, mid: int, c_out: int, res: int, residual: bool, out_scale: float = 1.0):
        super().__init__()
        k = 3 if res >= 3 else 1
        self.convs = nn.ModuleList(
            [
                Conv2d(c_in, mid, 1),
                Conv2d(mid, mid, k, padding=k // 2),
                Conv2d(mid, mid, k, padding=k // 2),
            ]
        )
        self.out = Conv2d(mid, c_out, 1)
        with torch.no_grad():
            self.out.weight.mul_(out_scale)
            self.out.bias.zero_()
        self.residual = residual and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for conv in [*self.convs, self.out]:
            h = conv(h, gelu_input=True)
        return x + h if self.residual else h


class LatentGroup(nn.Module):
    """One top-down step: prior and posterior of z_i, then the state update."""

    onednn = False  # its convolutions on fasthvae_onednn, its GELUs fused (fasthvae.nn.use_onednn_conv)

    def __init__(self, spec: DeepSpec, res: int, depth_scale: float, name: str) -> None:
        super().__init__()
        self.name = name
        w, z, mid = spec.width, spec.zdim, max(1, int(spec.width * spec.bottleneck))
        self.zdim = z
        self.posterior = Cell(2 * w, mid, 2 * z, res, residual=False)
        self.prior = Cell(
            w, mid, 2 * z + w, res, residual=False, out_scale=0.0
        )  # starts at N(0, I), no feature
        self.project = Conv2d(z, w, 1)
        with torch.no_grad():
            self.project.weight.mul_(depth_scale)
        self.cell = Cell(w, mid, w, res, residual=True, out_scale=depth_scale)

    def prior_params(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mu_p, logvar_p, features for the state) from the top-down state h."""
        return self._split_prior(self.prior(h))

    def posterior_outputs(self, h: Tensor, activation: Tensor) -> Gaussian:
        """The posterior cell's two outputs from h and the activation (``posterior_from`` makes
        them q's mean and log-variance)."""
        mu, logvar = self.posterior(torch.cat([h, activation], 1)).chunk(2, 1)
        return mu, logvar

    def prior_and_posterior(self, h: Tensor, read: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], Gaussian]:
        """``prior_params(h)`` and ``posterior_outputs(h, activation)`` with the two cells run as one,
        given the posterior's ``read`` of the activation (``DeepHVAE.posterior_reads``): the first
        conv reads ``gelu(h)`` for both cells (the posterior's first conv over [h, activation] is its
        conv over h plus its read of the activation), the 3x3s are grouped convs, the last conv is
        block-diagonal. The same parameters and values, half the conv calls: a 16-channel conv
        costs more in calls than in arithmetic. The FLOP counter counts 10% more for the `small` step
        this way (the last conv's zero blocks, and a grouped conv's backward counted as a third more
        than its two halves'; ``tests/test_deep.py``). No channel concatenation of activations is
        formed: Inductor lays one out as NCHW in a channels_last step and transposes into it."""
        prior, posterior = self.prior, self.posterior
        (first_p, *rest_p), (first_q, *rest_q) = prior.convs, posterior.convs
        x = gelu_conv2d(
            h,
            torch.cat([first_p.weight, first_q.weight[:, : h.shape[1]]]),
            torch.cat([first_p.bias, first_q.bias]),
            onednn=self.onednn,
        )
        x = x + F.pad(read, (0, 0, 0, 0, read.shape[1], 0))  # the read reaches the posterior's half
        for conv_p, conv_q in zip(rest_p, rest_q, strict=True):
            weight, bias = torch.cat([conv_p.weight, conv_q.weight]), torch.cat([conv_p.bias, conv_q.bias])
            x = gelu_conv2d(x, weight, bias, padding=conv_p.padding, groups=2, onednn=self.onednn)
        out_p, out_q = prior.out.weight, posterior.out.weight
        block_diagonal = torch.cat(
            [
                torch.cat([out_p, torch.zeros_like(out_p)], 1),  # both cells have the same inner width
                torch.cat([torch.zeros_like(out_q), out_q], 1),
            ]
        )
        out = gelu_conv2d(
            x,
            block_diagonal,
            torch.cat([prior.out.bias, posterior.out.bias]),
            onednn=self.onednn,
        )
        prior_out, posterior_out = out.split([out_p.shape[0], out_q.shape[0]], 1)
        mu_q, logvar_q = posterior_out.chunk(2, 1)
        return self._split_prior(prior_out), (mu_q, logvar_q)

    def _split_prior(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar, features = out[:, : self.zdim], out[:, self.zdim : 2 * self.zdim], out[:, 2 * self.zdim :]
        return mu, soft_clamp(logvar), features

    def advance(self, h: Tensor, features: Tensor, z: Tensor) -> Tensor:
        return self.cell(h + features + self.project(z))


class DeepHVAE(LatentVariableModel):
    """``spec`` (a :class:`DeepSpec`, or a preset's name) sizes the model; ``likelihood`` as the others."""

    onednn = False  # its convolutions on fasthvae_onednn, its GELUs fused (fasthvae.nn.use_onednn_conv)

    def __init__(self, spec: DeepSpec | str = "small", likelihood: str = "mixture") -> None:
        super().__init__(likelihood)
        if isinstance(spec, str):
            if spec not in PRESETS:
                raise ValueError(f"unknown deep preset {spec!r}; choose one of {', '.join(PRESETS)}")
            spec = PRESETS[spec]
        self.spec = spec
        blocks = parse_blocks(spec.layout)
        self.resolutions = [res for res, latent in blocks if latent]
        scales = sorted({res for res, _ in blocks})  # top (coarsest) first
        latent_scales = sorted(set(self.resolutions))
        self.group_names = [f"kl_{i:02d}_{r}x{r}" for i, r in enumerate(self.resolutions)]
        self.kl_levels = {
            n: latent_scales.index(r) for n, r in zip(self.group_names, self.resolutions, strict=True)
        }
        self.kl_dims = {n: spec.zdim * r * r for n, r in zip(self.group_names, self.resolutions, strict=True)}
        w, mid = spec.width, max(1, int(spec.width * spec.bottleneck))
        depth_scale = 1 / math.sqrt(len(blocks))
        enc_scale = 1 / math.sqrt(spec.encoder_blocks * len(scales))

        self.stem = Conv2d(3, w, 3, padding=1)
        self.encoder_scales = scales[::-1]  # bottom-up: 32 first
        self.encoder = nn.ModuleList(
            nn.Sequential(
                *[Cell(w, mid, w, r, residual=True, out_scale=enc_scale) for _ in range(spec.encoder_blocks)]
            )
            for r in self.encoder_scales
        )
        self.top = nn.Parameter(torch.zeros(1, w, scales[0], scales[0]))
        self.groups = nn.ModuleList(
            LatentGroup(spec, r, depth_scale, name)
            for r, name in zip(self.resolutions, self.group_names, strict=True)
        )
        self.cells = nn.ModuleList(
            Cell(w, mid, w, r, residual=True, out_scale=depth_scale) for r, latent in blocks if not latent
        )
        groups, cells = iter(self.groups), iter(self.cells)
        # The top-down pass in order: (resolution, a LatentGroup or a Cell without a latent).
        self.top_down: list[tuple[int, nn.Module]] = [
            (r, next(groups) if latent else next(cells)) for r, latent in blocks
        ]
        self.head = Conv2d(w, likelihoods.out_channels(likelihood), 1)
        # Each group's prior and posterior cells as one set of convs (the faster step); False runs
        # them apart, the same values, as the FLOP count of the model's own work needs.
        self.heads_as_one = True

    # ---- the two passes

    def bottom_up(self, x: Tensor) -> dict[int, Tensor]:
        """The bottom-up activations, by resolution."""
        h = self.stem(x * 2 - 1)
        activations = {}
        for res, blocks in zip(self.encoder_scales, self.encoder, strict=True):
            if h.shape[-1] != res:
                h = F.avg_pool2d(h, h.shape[-1] // res)
            h = blocks(h)
            activations[res] = h
        return activations

    def _start(self, batch: int) -> Tensor:
        return self.top.expand(batch, -1, -1, -1)

    @staticmethod
    def _fit(h: Tensor, res: int) -> Tensor:
        return h if h.shape[-1] == res else upsample_nearest(h, res // h.shape[-1])

    def _walk(self, h: Tensor, activations: dict[int, Tensor] | None, draw: Draw) -> Tensor:
        """The top-down pass from state ``h``, returning the last state. Cells advance the state;
        each latent group computes its prior and, given the bottom-up ``activations``, its
        posterior, and continues with ``draw(group, (mu_p, logvar_p), (mu_q, logvar_q) or None)``:
        the z that training, encoding, sampling and the importance weights each draw their way."""
        reads = (
            iter(self.posterior_reads(activations)) if activations is not None and self.heads_as_one else None
        )
        for res, block in self.top_down:
            h = self._fit(h, res)
            if isinstance(block, Cell):
                h = block(h)
                continue
            if activations is None:
                (mu_p, logvar_p, features), posterior = block.prior_params(h), None
            elif self.heads_as_one:
                (mu_p, logvar_p, features), posterior = block.prior_and_posterior(h, next(reads))
            else:
                mu_p, logvar_p, features = block.prior_params(h)
                posterior = block.posterior_outputs(h, activations[res])
            if posterior is not None:
                posterior = posterior_from(posterior, (mu_p, logvar_p), self.spec.posterior)
            h = block.advance(h, features, draw(block, (mu_p, logvar_p), posterior))
        return h

    def posterior_reads(self, activations: dict[int, Tensor]) -> list[Tensor]:
        """Each latent group's read of its resolution's activation, top first: its posterior's first
        conv on ``gelu(activation)``, the weight's activation columns, no bias. The groups of a
        resolution read the same activation, so their reads are one conv (their weights stacked),
        one call per resolution."""
        reads: list[Tensor] = []
        for res in sorted(set(self.resolutions)):
            groups = [g for g, r in zip(self.groups, self.resolutions, strict=True) if r == res]
            activation = activations[res]
            weight = torch.cat([g.posterior.convs[0].weight[:, activation.shape[1] :] for g in groups])
            read = gelu_conv2d(activation, weight, onednn=self.onednn)
            reads += read.chunk(len(groups), 1)
        return reads

    def forward(self, x: Tensor, kl_reduction: str = "sample") -> Output:
        kls = {}

        def from_posterior(group: LatentGroup, prior: Gaussian, posterior: Gaussian | None) -> Tensor:
            z, kls[group.name] = ops.sample_and_kl(*posterior, *prior, reduction=kl_reduction)
            return z

        h = self._walk(self._start(len(x)), self.bottom_up(x), from_posterior)
        return Output(self.head(h), kls)

    @torch.no_grad()
    def encode(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """q(z_i | x, z_<i) per group, top down: (mu, logvar), each [B, zdim, res, res], along one
        posterior sample (each group's posterior depends on the samples above it)."""
        posteriors = {}

        def keep_posterior(group: LatentGroup, prior: Gaussian, posterior: Gaussian | None) -> Tensor:
            posteriors[group.name] = posterior
            return ops.reparameterize(*posterior)

        self._walk(self._start(len(x)), self.bottom_up(x), keep_posterior)
        return posteriors

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """Mean images of z_i ~ p(z_i | z_<i) with each standard deviation times T, top down."""

        def from_prior(group: LatentGroup, prior: Gaussian, posterior: Gaussian | None) -> Tensor:
            mu_p, logvar_p = prior
            return (
                mu_p if temperature == 0 else ops.reparameterize(mu_p, logvar_p + 2 * math.log(temperature))
            )

        h = self._walk(self._start(n).to(self.head.weight.dtype), None, from_prior)
        return self.decode_mean(self.head(h))

    @torch.no_grad()
    def log_weight(self, x: Tensor) -> Tensor:
        """One importance weight log p(x, z) - log q(z | x), z drawn from q group by group: float32 [B]."""
        log_ratio = torch.zeros(len(x), device=x.device)

        def weigh(group: LatentGroup, prior: Gaussian, posterior: Gaussian | None) -> Tensor:
            nonlocal log_ratio
            mu_q, logvar_q = posterior
            z = sample_gaussian(mu_q.float(), logvar_q.float())
            log_ratio = log_ratio + gaussian_log_prob(z, *prior) - gaussian_log_prob(z, mu_q, logvar_q)
            return z.to(mu_q.dtype)

        h = self._walk(self._start(len(x)), self.bottom_up(x), weigh)
        return -likelihoods.nll(self.likelihood, self.head(h), x) + log_ratio
