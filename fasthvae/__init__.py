"""fasthvae: fast VAE and hierarchical VAE training with fused Gaussian kernels.

>>> import fasthvae
>>> model = fasthvae.load("runs/latest")          # a run folder or a checkpoint; EMA weights if kept
>>> images = model.sample(16, temperature=0.8)    # [16, 3, 32, 32] in [0, 1]
>>> elbo = model.elbo(x)                          # nats per image
"""

from fasthvae.version import __version__

__all__ = ["__version__", "load"]


def load(path, device="cpu", dtype=None):
    """The trained model of a run folder or checkpoint, in eval mode, on ``device`` (and ``dtype``
    when given): ``sample(n, temperature=)``, ``reconstruct(x)``, ``encode(x)``, ``elbo(x)``.
    Raises :class:`fasthvae.training.checkpoint.CheckpointError` naming what does not fit."""
    from fasthvae.eval.runs import load_run

    return load_run(path, device, dtype)[0]
