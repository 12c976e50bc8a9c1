"""Test set-up: Triton runs in its interpreter on CPU-only machines (set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
