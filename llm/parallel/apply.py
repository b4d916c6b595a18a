"""The `parallelism` config group: each option is a Lightning strategy plus what to apply to the
plain model (tensor or expert parallelism, FSDP2, activation checkpointing, torch.compile), in the
order torchtitan applies them: TP or EP, then activation checkpointing, then compile, then FSDP."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

CHECKPOINT_MODES = ("none", "full", "every_n")


def apply_activation_checkpointing(model: nn.Module, mode: str, every_n: int = 2) -> None:
    if mode == "none":
        return
    for i, block in enumerate(model.blocks):
        if mode == "full" or i % every_n == 0:
            # torch's wrapper keeps state-dict keys unchanged, so checkpoints stay interchangeable
            # between runs with and without activation checkpointing.
            model.blocks[i] = checkpoint_wrapper(block)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately (as torchtitan does): small graphs, shared by identical blocks."""
    for block in model.blocks:
        block.compile()


class Single:
    """One process on one device (Lightning's single-device strategy)."""

    sharded_checkpoints = False

    def __init__(self, activation_checkpointing: str = "none", checkpoint_every_n: int = 2, compile: bool = False):
        if activation_checkpointing not in CHECKPOINT_MODES:
            raise ValueError(f"parallelism.activation_checkpointing={activation_checkpointing!r}: "
                             f"choose one of {', '.join(CHECKPOINT_MODES)}")
        self.activation_checkpointing = activation_checkpointing
        self.checkpoint_every_n = checkpoint_every_n
        self.compile = compile
        self.tensor_parallel = 1
        self.expert_parallel = 1

    def strategy(self, world_size: int = 1) -> Any:
        return "auto"

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.tensor_parallel

    def wrap(self, model: nn.Module) -> None:
        """Activation checkpointing and compile: the per-block wrappers every option shares."""
        apply_activation_checkpointing(model, self.activation_checkpointing, self.checkpoint_every_n)
        if self.compile:
            apply_compile(model)

    def parallelize(self, model: nn.Module, device_mesh: Any = None) -> nn.Module:
        self.wrap(model)
        return model


class DDP(Single):
    """Data parallel: a full replica per process, gradients averaged by all-reduce (NCCL on GPUs,
    gloo on CPUs). With `expert_parallel` > 1 the MoE experts are split over groups of that many
    ranks instead (`llm.parallel.expert`)."""

    def __init__(self, find_unused_parameters: bool = False, expert_parallel: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.find_unused_parameters = find_unused_parameters
        self.expert_parallel = expert_parallel

    def strategy(self, world_size: int = 1) -> Any:
        from pytorch_lightning.strategies import DDPStrategy

        if self.expert_parallel > 1:
            from llm.parallel.strategy import ExpertParallelDDPStrategy

            return ExpertParallelDDPStrategy(find_unused_parameters=self.find_unused_parameters)
        return DDPStrategy(find_unused_parameters=self.find_unused_parameters)

    def parallelize(self, model: nn.Module, device_mesh: Any = None) -> nn.Module:
        if self.expert_parallel > 1:
            import torch.distributed as dist

            from llm.parallel.expert import apply_expert_parallel, average_expert_gradients, expert_mesh, \
                gather_in_state_dicts

            mesh = expert_mesh(self.expert_parallel)
            for experts in apply_expert_parallel(model, mesh):
                average_expert_gradients(experts, dist.get_world_size(), mesh["expert_replicate"])
                gather_in_state_dicts(experts)
        return super().parallelize(model, device_mesh)


class FSDP(Single):
    """FSDP2 over the data-parallel ranks, optionally with tensor parallelism (a 2-D dp x tp
    mesh) and hybrid sharding (replicate x shard), through Lightning's ModelParallelStrategy
    (with a safe resume load: `llm.parallel.strategy`)."""

    sharded_checkpoints = True

    def __init__(self, tensor_parallel: int = 1, replicate: Optional[int] = None, reshard_after_forward: bool = True,
                 param_dtype: str = "float32", reduce_dtype: str = "float32", cpu_offload: bool = False,
                 expert_parallel: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.tensor_parallel = tensor_parallel
        self.expert_parallel = expert_parallel
        self.replicate = replicate
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.cpu_offload = cpu_offload

    def strategy(self, world_size: int = 1) -> Any:
        from llm.parallel.strategy import SafeModelParallelStrategy  # its resume unpickles nothing unsafe

        return SafeModelParallelStrategy(data_parallel_size=self.data_parallel_size(world_size),
                                         tensor_parallel_size=self.tensor_parallel,
                                         save_distributed_checkpoint=True)

    def parallelize(self, model: nn.Module, device_mesh: Optional[Any] = None) -> nn.Module:
        from llm.parallel.fsdp import apply_fsdp, shard_experts
        from llm.parallel.tensor_parallel import apply_tensor_parallel

        if self.tensor_parallel > 1:
            apply_tensor_parallel(model, device_mesh["tensor_parallel"])
        experts = []
        if self.expert_parallel > 1:
            from llm.parallel.expert import apply_expert_parallel, average_expert_gradients, expert_mesh

            ep_mesh = expert_mesh(self.expert_parallel, device_mesh.device_type)
            experts = apply_expert_parallel(model, ep_mesh)
            for module in experts:
                average_expert_gradients(module, self.expert_parallel)
        self.wrap(model)
        for module in experts:  # before the blocks: their fully_shard leaves these parameters alone
            shard_experts(module, ep_mesh["expert_replicate"], self.reshard_after_forward, self.param_dtype,
                          self.reduce_dtype, self.cpu_offload)
        apply_fsdp(model, self.shard_mesh(device_mesh), self.reshard_after_forward, self.param_dtype,
                   self.reduce_dtype, self.cpu_offload)
        return model

    def shard_mesh(self, device_mesh: Any) -> Any:
        """The data-parallel mesh to shard over: 1-D for FSDP, replicate x shard for HSDP."""
        dp_mesh = device_mesh["data_parallel"]
        if self.replicate is None:
            return dp_mesh
        from torch.distributed.device_mesh import init_device_mesh

        dp = dp_mesh.size()
        if dp % self.replicate:
            raise ValueError(f"parallelism.replicate={self.replicate} must divide the {dp} data-parallel ranks")
        return init_device_mesh(dp_mesh.device_type, (self.replicate, dp // self.replicate),
                                mesh_dim_names=("replicate", "shard"))
