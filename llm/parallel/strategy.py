"""Lightning's ModelParallelStrategy (FSDP2, TP, HSDP) with a resume that runs nothing from disk, and
DDPStrategy for expert parallelism.

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

from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy
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


class ExpertParallelDDPStrategy(DDPStrategy):
    """DDPStrategy for expert parallelism (`llm.parallel.expert`): DDP all-reduces every parameter
    but the experts (averaged in the forward's graph), and the one-file checkpoint holds the whole
    expert tensors and their optimizer state, as a single-process run's (gathered on save by every
    rank, as Lightning's save runs on every rank; each rank keeps its own experts on load)."""

    def _setup_model(self, model: nn.Module) -> Any:
        from llm.parallel.expert import hide_experts_from_ddp

        hide_experts_from_ddp(model)
        return super()._setup_model(model)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        from llm.parallel.expert import gather_optimizer_state

        return gather_optimizer_state(getattr(optimizer, "_optimizer", optimizer), super().optimizer_state(optimizer))

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        from lightning_fabric.utilities.optimizer import _optimizer_to_device

        from llm.parallel.expert import shard_optimizer_state

        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(shard_optimizer_state(optimizer, state))
            _optimizer_to_device(optimizer, self.root_device)
