"""The study's models: a standard VAE and a two-level HVAE with a learned prior p(z1 | z2)."""

from collections.abc import Mapping

from fasthvae.models.base import LatentVariableModel, Output
from fasthvae.models.hvae import HVAE
from fasthvae.models.vae import VAE

MODELS = {"vae": VAE, "hvae": HVAE}

__all__ = ["HVAE", "MODELS", "VAE", "LatentVariableModel", "Output", "build_model", "build_model_from_config"]


def build_model(name: str, **kwargs) -> LatentVariableModel:
    """A model by name (``vae`` or ``hvae``) with its keyword arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def build_model_from_config(config: Mapping) -> LatentVariableModel:
    """The model a training config (``fasthvae.train.TrainConfig`` as a dict) describes."""
    kwargs = {"channels": config["channels"], "latent": config["latent"], "likelihood": config["likelihood"]}
    if config["model"] == "hvae":
        kwargs["z1_channels"] = config["z1_channels"]
    return build_model(config["model"], **kwargs)
