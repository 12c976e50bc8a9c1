"""Trained runs read back: the model a run folder or checkpoint holds, with its training config."""

from pathlib import Path

import torch

from fasthvae.models import LatentVariableModel, build_model_from_config
from fasthvae.training.checkpoint import CheckpointError, load_checkpoint
from fasthvae.version import __version__


def load_run(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[LatentVariableModel, dict, Path]:
    """(model in eval mode, its training config, the checkpoint path) from a run folder or checkpoint.

    A run trained with an EMA gives its averaged weights, which the trainer evaluates too."""
    path = Path(path)
    checkpoint = path / "checkpoint.pt" if path.is_dir() else path
    state = load_checkpoint(checkpoint)
    config = state["config"]
    written_by = state.get("fasthvae_version", "0.1.0 or older")
    try:
        model = build_model_from_config(config)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{checkpoint}: its config does not describe a model this fasthvae ({__version__}) builds "
            f"(written by fasthvae {written_by}): {err}"
        ) from err
    weights = state["ema"]["model"] if state.get("ema") else state["model"]
    differences = state_dict_differences(model.state_dict(), weights)
    if differences:
        raise CheckpointError(
            f"{checkpoint}: written by fasthvae {written_by}, its weights do not fit the model that "
            f"fasthvae {__version__} builds from its config: {differences}"
        )
    model.load_state_dict(weights)
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval(), config, checkpoint


def state_dict_differences(expected: dict, given: dict, show: int = 5) -> str:
    """What keeps ``given`` from loading into a model whose state dict is ``expected`` ('' if nothing)."""
    parts = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape (saved vs built)", shapes),
    ):
        if items:
            more = f" and {len(items) - show} more" if len(items) > show else ""
            parts.append(f"{label}: {', '.join(items[:show])}{more}")
    return "; ".join(parts)
