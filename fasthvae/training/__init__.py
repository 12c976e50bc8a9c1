"""Pieces of the trainer: precision, checkpoints, distributed set-up, plots."""
