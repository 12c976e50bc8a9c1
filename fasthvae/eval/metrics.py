"""Test-set measures of a trained model: reconstruction (BCE and squared error per image), each KL,
the negative ELBO, an importance-weighted bound with K samples, and bits/dim where the likelihood is
discretized (nats / (3072 ln 2)). BCE is not a likelihood of 8-bit images: it has no bits/dim.

``neg_elbo`` is an unbiased estimate of the model's negative ELBO: reconstruction plus the analytic
KLs where those are exact (``model.analytic_elbo``: the VAE, the deep top-down model), otherwise one
importance weight ``-log_weight(x)``. The two-level HVAE is the otherwise: its analytic
KL(q(z1 | x) || p(z1 | z2)) takes z2 from q(z2 | z1) of another z1, and z1, z2 are dependent under
q, so that sum (its training objective at alpha = beta = 1) is reported as ``study_objective``.
"""

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from fasthvae import likelihoods
from fasthvae.models import LatentVariableModel
from fasthvae.training.precision import autocast


def iw_bound(model: LatentVariableModel, x: Tensor, k: int) -> Tensor:
    """-log of the K-sample importance-weighted estimate of p(x), per image [B] (nats).

    With K = 1 it is the negative ELBO of one sample; it decreases (tightens) towards -log p(x)
    as K grows, in expectation.
    """
    log_w = torch.stack([model.log_weight(x) for _ in range(k)])
    return -(torch.logsumexp(log_w.double(), 0) - math.log(k)).float()


@torch.no_grad()
def evaluate_model(
    model: LatentVariableModel,
    batches: Iterable[Tensor],
    iw_samples: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Per-image means over ``batches`` of float images in [0, 1] (model in eval mode meanwhile)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    device = next(model.parameters()).device
    for x in batches:
        with autocast(device.type, autocast_dtype):
            out = model(x)
        terms = {"nll": likelihoods.nll(model.likelihood, out.decoded, x)}
        terms.update(likelihoods.image_errors(model.decode_mean(out.decoded), x))
        terms.update({k: v.float() for k, v in out.kls.items()})
        analytic = terms["nll"] + sum(v.float() for v in out.kls.values())
        if model.analytic_elbo:
            terms["neg_elbo"] = analytic
        else:
            terms["neg_elbo"] = -model.log_weight(x)
            terms["study_objective"] = analytic
        if iw_samples:
            terms[f"neg_iw_bound_k{iw_samples}"] = iw_bound(model, x, iw_samples)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.double().sum())
        count += len(x)
    model.train(was_training)
    result = {name: total / count for name, total in sums.items()}
    result["images"] = count
    if model.likelihood in likelihoods.DISCRETE:
        for name in [n for n in result if n.startswith("neg_")]:
            result[f"{name}_bits_per_dim"] = likelihoods.bits_per_dim(result[name])
    return result
