"""The Lightning strategy of pipeline parallelism: `SafeModelParallelStrategy` (FSDP2/TP, safe
sharded resume) on a 3-D mesh, pipeline x data_parallel x tensor_parallel (outermost first, as
torchtitan orders it: a pipeline's point-to-point traffic is the lightest, so it spans nodes).

Lightning's data sampler reads the `data_parallel` axis, so the ranks of one pipeline (and of one
tensor-parallel group) see the same batches: the first stage needs the tokens, the last the targets."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.strategies import ModelParallelStrategy

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
