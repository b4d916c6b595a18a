"""Throughput and model FLOPs utilisation (MFU), logged as perf/tokens_per_s and perf/mfu."""

from __future__ import annotations

import time
from collections import deque
from functools import lru_cache

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name fragment; most specific first.
GPU_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


@lru_cache(maxsize=None)
def measured_cpu_peak(size: int = 2048, repeats: int = 6) -> float:
    """The best of repeated fp32 matmuls on this CPU with the current thread count (a single
    timing can read far lower on a shared machine, so take the best)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device: the table for GPUs, a measured matmul peak for CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in GPU_PEAK_FLOPS:
            if fragment in name:
                return peak
        return float("nan")
    return measured_cpu_peak()


class ThroughputMonitor(Callback):
    """Tokens/s over a sliding window of optimizer steps (validation pauses excluded), and MFU
    against the peak of all devices in the run."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, window: int = 10):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.times: deque[float] = deque(maxlen=window + 1)
        self.last_step = -1
        self.train_seconds = 0.0
        self.train_steps = 0
        self.peak = float("nan")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.peak = peak_flops(pl_module.device) * trainer.world_size

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if trainer.global_step == self.last_step:  # a micro-batch inside gradient accumulation
            return
        self.last_step = trainer.global_step
        now = time.perf_counter()
        if self.times:
            self.train_seconds += now - self.times[-1]
            self.train_steps += 1
        self.times.append(now)
        if len(self.times) < 2 or trainer.global_step % trainer.log_every_n_steps:
            return
        tokens_per_s = self.tokens_per_step * (len(self.times) - 1) / (self.times[-1] - self.times[0])
        pl_module.log("perf/tokens_per_s", tokens_per_s, prog_bar=True)
        pl_module.log("perf/mfu", tokens_per_s * self.flops_per_token / self.peak)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.clear()  # the next window starts after validation

    @property
    def mean_tokens_per_s(self) -> float:
        return self.tokens_per_step * self.train_steps / self.train_seconds if self.train_seconds else float("nan")


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory, or the peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
