"""The study's models (a standard VAE, a two-level HVAE with a learned prior p(z1 | z2)) and the deep
top-down HVAE of its next step."""

from collections.abc import Mapping
from dataclasses import replace

from fasthvae.models.base import LatentVariableModel, Output
from fasthvae.models.deep import POSTERIORS, PRESETS, DeepHVAE, DeepSpec
from fasthvae.models.hvae import HVAE
from fasthvae.models.vae import VAE

MODELS = {"vae": VAE, "hvae": HVAE, "deep": DeepHVAE}

__all__ = [
    "HVAE",
    "MODELS",
    "POSTERIORS",
    "PRESETS",
    "VAE",
    "DeepHVAE",
    "DeepSpec",
    "LatentVariableModel",
    "Output",
    "build_model",
    "build_model_from_config",
    "deep_spec",
]


def build_model(name: str, **kwargs) -> LatentVariableModel:
    """A model by name (``vae``, ``hvae`` or ``deep``) with its keyword arguments."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def build_model_from_config(config: Mapping) -> LatentVariableModel:
    """The model a training config (``fasthvae.train.TrainConfig`` as a dict) describes."""
    if config["model"] == "deep":
        return DeepHVAE(deep_spec(config), likelihood=config["likelihood"])
    kwargs = {"channels": config["channels"], "latent": config["latent"], "likelihood": config["likelihood"]}
    if config["model"] == "hvae":
        kwargs["z1_channels"] = config["z1_channels"]
    return build_model(config["model"], **kwargs)


def deep_spec(config: Mapping) -> DeepSpec:
    """The preset a config names, with its ``layout``, ``width``, ``zdim`` and ``posterior``
    overrides (None or absent: keep)."""
    if config["preset"] not in PRESETS:
        raise ValueError(f"unknown deep preset {config['preset']!r}; choose one of {', '.join(PRESETS)}")
    overrides = {k: config[k] for k in ("layout", "width", "zdim", "posterior") if config.get(k) is not None}
    return replace(PRESETS[config["preset"]], **overrides)
