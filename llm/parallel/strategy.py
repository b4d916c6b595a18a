"""Lightning's ModelParallelStrategy (FSDP2, TP, HSDP) with a resume that runs nothing from disk.

Lightning loads a sharded checkpoint with `torch.distributed.checkpoint.load(state,
checkpoint_id=path)`, whose reader unpickles the shards' index (`.metadata`) with plain `pickle`
and whose planner unpickles non-tensor entries with `torch.load(weights_only=False)`: a crafted
checkpoint directory would run code on every rank. `SafeModelParallelStrategy.load_checkpoint`
does what Lightning's does, with public torch APIs only, through `llm.checkpoint.safe_reader`;
a single-file checkpoint goes to Lightning's own load with `weights_only=True`.

Before Lightning is handed a checkpoint, `resume=` has already checked it
(`llm.checkpoint.checkpoint_problem`, which reads the index with the same safe reader) and set it
aside as corrupt when refused; this load is the second guard, for the checkpoints Lightning opens
itself (rollbacks, WSD branches) and for a directory changed after that check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.optim import Optimizer


class SafeModelParallelStrategy(ModelParallelStrategy):
    """ModelParallelStrategy whose checkpoint load unpickles nothing beyond tensors, plain values and
    torch's checkpoint metadata; saving is Lightning's own."""

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        from llm.checkpoint.meta import is_sharded

        path = Path(self.broadcast(checkpoint_path))  # as Lightning: every rank loads rank zero's path
        if not is_sharded(path):  # one file (llm-consolidate's): tensors and plain types only
            return super().load_checkpoint(path, weights_only=True)
        return load_sharded(path, self.model, self.optimizers, strict=self.lightning_module.strict_loading)


def load_sharded(path: Path, module: nn.Module, optimizers: list[Optimizer], strict: bool = True) -> dict[str, Any]:
    """Lightning's load of its sharded layout (`state_dict`: the module, `optimizer_<i>`: each
    optimizer, meta.pt: the rest), each rank filling its own shards; returns meta.pt's contents
    for Lightning to restore loops and callbacks from."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from llm.checkpoint.meta import load_meta

    module_state = {"state_dict": get_model_state_dict(module)}
    _load(module_state, path)
    module.load_state_dict(module_state["state_dict"], strict=strict)
    for i, optimizer in enumerate(optimizers):  # loaded one by one, as Lightning does
        key = f"optimizer_{i}"
        optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
        _load(optimizer_state, path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return load_meta(path)


def _load(state: dict[str, Any], path: Path) -> None:
    from llm.checkpoint.safe_reader import safe_load

    safe_load(state, path)
