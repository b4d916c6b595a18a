"""Checkpoint files that are either whole or absent, written through `llm.files.atomic_write`.

A sharded FSDP/TP checkpoint (a directory every rank writes into) cannot be one atomic file: the
PeriodicCheckpoint callback (llm.tracking.checkpoints) writes it to a temporary directory and
renames it into place instead.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import nn

from llm.checkpoint.load import PREFIX
from llm.files import atomic_write


def verify_readable(path: Path) -> None:
    """The archive is whole and its index readable (tensors memory-mapped, not read)."""
    torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` so that a reader (or a resume after a crash) sees the old file or the
    whole new one. The new file is read back before it replaces the old: a write that the disk
    or filesystem silently cut short fails here, while the previous checkpoint is still in place."""
    with atomic_write(path, check=verify_readable) as f:
        torch.save(obj, f)


def save_network(model: nn.Module, path: str | Path, llm: Optional[dict[str, Any]] = None,
                 global_step: int = 0) -> Path:
    """An ordinary checkpoint of a plain network (Transformer or ValueModel), which every loader
    reads like a training checkpoint: Lightning's layout (`state_dict` with `model.` prefixes)
    and our `llm` dict (stage, value_head, parent, ...; model_config is the network's)."""
    meta = {"model_config": asdict(model.cfg), **(llm or {})}
    atomic_torch_save({"state_dict": {PREFIX + k: v for k, v in model.state_dict().items()},
                       "global_step": global_step, "llm": meta}, path)
    return Path(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin for single-file checkpoints: atomic saves, safe loads."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict:
        # Our checkpoints hold tensors and plain types only, so the safe loader always suffices.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
