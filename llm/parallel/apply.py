"""Parallelism options: each turns the `parallelism` config group into a Lightning strategy and
applies activation checkpointing and torch.compile to the plain model, block by block."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

CHECKPOINT_MODES = ("none", "full", "every_n")


class CheckpointedBlock(nn.Module):
    """Recomputes the wrapped block's activations in backward instead of storing them."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> Any:
        if not self.training:
            return self.block(*args)
        return checkpoint(self.block, *args, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, mode: str, every_n: int = 2) -> None:
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"parallelism.activation_checkpointing={mode!r}: choose one of {', '.join(CHECKPOINT_MODES)}")
    if mode == "none":
        return
    for i, block in enumerate(model.blocks):
        if mode == "full" or i % every_n == 0:
            model.blocks[i] = CheckpointedBlock(block)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately (as torchtitan does): small graphs, shared by identical blocks."""
    for block in model.blocks:
        block.compile()


class Single:
    """One process on one device (Lightning's default single-device strategy)."""

    def __init__(self, activation_checkpointing: str = "none", checkpoint_every_n: int = 2, compile: bool = False):
        if activation_checkpointing not in CHECKPOINT_MODES:
            raise ValueError(
                f"parallelism.activation_checkpointing={activation_checkpointing!r}: choose one of {', '.join(CHECKPOINT_MODES)}"
            )
        self.activation_checkpointing = activation_checkpointing
        self.checkpoint_every_n = checkpoint_every_n
        self.compile = compile

    def strategy(self) -> Any:
        return "auto"

    def parallelize(self, model: nn.Module, device_mesh: Any = None) -> nn.Module:
        apply_activation_checkpointing(model, self.activation_checkpointing, self.checkpoint_every_n)
        if self.compile:
            apply_compile(model)
        return model
