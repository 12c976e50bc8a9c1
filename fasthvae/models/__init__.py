"""The study's models: a standard VAE and a two-level HVAE with a learned prior p(z1 | z2)."""

from fasthvae.models.base import LatentVariableModel, Output
from fasthvae.models.hvae import HVAE
from fasthvae.models.vae import VAE

MODELS = {"vae": VAE, "hvae": HVAE}

__all__ = ["HVAE", "MODELS", "VAE", "LatentVariableModel", "Output", "build_model"]


def build_model(name: str, **kwargs) -> LatentVariableModel:
    """A model by name (``vae`` or ``hvae``) with its keyword arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
