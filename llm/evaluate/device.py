"""Where llm-generate and llm-eval run a model."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
