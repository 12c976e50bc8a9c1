"""Trained runs read back: the model a run folder or checkpoint holds, with its training config."""

from pathlib import Path

import torch

from fasthvae.models import LatentVariableModel, build_model_from_config
from fasthvae.training.checkpoint import CheckpointError, load_checkpoint


def load_run(path: Path, device: torch.device) -> tuple[LatentVariableModel, dict, Path]:
    """(model in eval mode, its training config, the checkpoint path) from a run folder or checkpoint.

    A run trained with an EMA gives its averaged weights, which the trainer evaluates too."""
    checkpoint = path / "checkpoint.pt" if path.is_dir() else path
    state = load_checkpoint(checkpoint)
    config = state["config"]
    model = build_model_from_config(config)
    weights = state["ema"]["model"] if state.get("ema") else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit the model its config describes ({err})"
        ) from err
    return model.to(device).eval(), config, checkpoint
