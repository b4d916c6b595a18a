"""Throughput and model FLOPs utilisation (MFU), logged as perf/tokens_per_s and perf/mfu."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

# The compute dtype of each Lightning precision: the peak MFU is measured against.
PRECISION_DTYPES = {
    "32-true": torch.float32, "32": torch.float32, "64-true": torch.float64,
    "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16, "16-true": torch.float16,
}


def compute_dtype(precision: str | int | None) -> torch.dtype:
    """The dtype the matmuls run in under a Lightning precision ("bf16-mixed": bfloat16); fp32 if unknown."""
    return PRECISION_DTYPES.get(str(precision), torch.float32)


@dataclass(frozen=True)
class Peak:
    """Peak FLOP/s of one device for a dtype, and where the figure comes from (printed beside MFU)."""

    flops: float
    source: str


@lru_cache(maxsize=None)
def measured_cpu_peak(size: int = 2048, repeats: int = 6, dtype: torch.dtype = torch.float32) -> float:
    """The best of repeated matmuls on this CPU with the current thread count (a single
    timing can read far lower on a shared machine, so take the best)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else the platform's machine type."""
    import platform
    from pathlib import Path

    with contextlib.suppress(OSError):  # not Linux, or no /proc: the platform's name below
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> Peak:
    """Peak FLOP/s of one device in `dtype`: Lightning's table of dense peaks (`get_available_flops`:
    CUDA GPUs and TPUs; TF32 for fp32 on Ampere or later unless matmul precision is "highest"), else,
    on a CPU, a measured matmul peak in that dtype. NaN (MFU unknown) for a GPU Lightning does not list."""
    from lightning_fabric.utilities.throughput import get_available_flops

    device = torch.device(device)
    name = str(dtype).removeprefix("torch.")
    if device.type == "cpu":
        # fp32 at 2048 (a few seconds in all); 16-bit CPU matmuls can be 10x slower, so smaller
        size = 2048 if dtype == torch.float32 else 1024
        threads = torch.get_num_threads()
        return Peak(measured_cpu_peak(size, dtype=dtype), f"measured: best {name} {size}x{size} matmul on this "
                                                          f"CPU, {threads} thread{'s' * (threads > 1)}")
    flops = get_available_flops(device, dtype)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if flops is None:
        return Peak(float("nan"), f"unknown: Lightning has no {name} peak for {label}")
    return Peak(float(flops), f"Lightning get_available_flops: {label}, {name}")


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """`device_peak(device, dtype).flops`."""
    return device_peak(device, dtype).flops


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
        self.peak = peak_flops(pl_module.device, compute_dtype(trainer.precision)) * trainer.world_size

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
