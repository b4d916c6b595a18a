"""Where llm-generate and llm-eval run a model."""

from __future__ import annotations

import torch


def resolve_device(device: str, quantize: str = "none") -> torch.device:
    """`auto` is CUDA when present, else the CPU; int8 models always run on the CPU (its kernels)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and quantize == "none" else "cpu")
    return torch.device(device)
