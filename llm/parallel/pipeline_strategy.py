"""The Lightning strategy of pipeline parallelism: `SafeModelParallelStrategy` (FSDP2/TP, safe
sharded resume) on a 3-D mesh, pipeline x data_parallel x tensor_parallel (outermost first, as
torchtitan orders it: a pipeline's point-to-point traffic is the lightest, so it spans nodes).

Lightning's data sampler reads the `data_parallel` axis, so the ranks of one pipeline (and of one
tensor-parallel group) see the same batches: the first stage needs the tokens, the last the targets.

Optimizer state is saved and loaded flattened by parameter name (`flatten_optimizer_state_dict`,
as torchtitan does): Lightning's nested layout keeps one `param_groups[i].params` list per group
key, which every pipeline rank writes with different names and the checkpoint keeps only one of,
so a resumed rank would find no group for its parameters. Flattened, each parameter's
hyperparameters and moments have keys of their own, which reshard across pipeline degrees."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.strategies import ModelParallelStrategy
from torch.optim import Optimizer

from llm.parallel.strategy import SafeModelParallelStrategy


class PipelineParallelStrategy(SafeModelParallelStrategy):
    def __init__(self, pipeline_parallel_size: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self._pipeline_parallel_size = pipeline_parallel_size

    def setup_environment(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        super(ModelParallelStrategy, self).setup_environment()  # not its 2-D mesh: ours below
        self._setup_distributed()
        pp, dp, tp = self._pipeline_parallel_size, self._data_parallel_size, self._tensor_parallel_size
        if pp * dp * tp != self.world_size:
            raise RuntimeError(f"pipeline {pp} x data parallel {dp} x tensor parallel {tp} != {self.world_size} ranks")
        self._device_mesh = init_device_mesh(self.root_device.type, (pp, dp, tp),
                                             mesh_dim_names=("pipeline", "data_parallel", "tensor_parallel"))
        self.lightning_module._device_mesh = self._device_mesh

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's own
        return get_optimizer_state_dict(self.model, optimizer, options=_OPTIONS())

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from llm.checkpoint.meta import is_sharded, load_meta
        from llm.checkpoint.safe_reader import safe_load

        path = Path(self.broadcast(checkpoint_path))
        if not is_sharded(path):  # one file (llm-consolidate's): tensors and plain types only
            return super().load_checkpoint(path, weights_only=True)
        module_state = {"state_dict": get_model_state_dict(self.model)}
        safe_load(module_state, path)
        self.model.load_state_dict(module_state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            state = {key: get_optimizer_state_dict(self.model, optimizer, options=_OPTIONS())}
            safe_load(state, path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[key], options=_OPTIONS())
        return load_meta(path)


def _OPTIONS() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(cpu_offload=True, flatten_optimizer_state_dict=True)
