"""FSDP2 (`fully_shard`): one shard unit per transformer block, then the root; expert-parallel
experts as units of their own over the ranks that hold the same experts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _policies(param_dtype: str, reduce_dtype: str, cpu_offload: bool) -> dict[str, Any]:
    for name, dtype in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if dtype not in DTYPES:
            raise ValueError(f"parallelism.{name}={dtype!r}: choose one of {', '.join(DTYPES)}")
    kwargs: dict[str, Any] = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype]),
    }
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True,
               param_dtype: str = "float32", reduce_dtype: str = "float32", cpu_offload: bool = False) -> None:
    """Shard every block and the root over `mesh` (1-D: FSDP; 2-D replicate x shard: HSDP).

    Parameters are kept in fp32 and cast to `param_dtype` for compute; gradients are reduced in
    `reduce_dtype` (bf16 compute with fp32 reduction is the usual GPU recipe)."""
    kwargs = {"mesh": mesh, **_policies(param_dtype, reduce_dtype, cpu_offload)}
    for i, block in enumerate(model.blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        last = i == len(model.blocks) - 1
        fully_shard(block, reshard_after_forward=reshard_after_forward and not last, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)


def shard_experts(experts: nn.Module, replicate_mesh: DeviceMesh, reshard_after_forward: bool = True,
                  param_dtype: str = "float32", reduce_dtype: str = "float32", cpu_offload: bool = False) -> None:
    """Shard an expert-parallel experts module (DTensors split over the EP axis) over the other
    axis, `replicate_mesh` (the ranks holding the same experts), as torchtitan does; its
    gradients are averaged over that axis (the rest of the mean: `llm.parallel.expert`)."""
    fully_shard(experts, mesh=replicate_mesh, reshard_after_forward=reshard_after_forward,
                **_policies(param_dtype, reduce_dtype, cpu_offload))
