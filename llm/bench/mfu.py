"""MFU of a real training run: `llm-train` with the given overrides on all its ranks, timed from
its own metrics file after a warm-up (torch.compile and the allocator settle there), and a
Markdown block of tokens/s, MFU and memory a maintainer can paste into the README.

`llm-bench bench=gpu` runs the 1B preset under FSDP in bf16 on every visible GPU; any other
config works the same way (`llm-bench bench.mfu=true model=small trainer=gpu`), on a CPU too.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from llm.tracking.metrics import read_metrics
from llm.tracking.throughput import Peak, compute_dtype, cpu_name, device_peak

log = logging.getLogger(__name__)


def train_command(overrides: list[str], steps: int, warmup: int, devices: int, run_dir: Path,
                  choices: Optional[list[str]] = None) -> list[str]:
    """llm-train with the config groups `choices` (["model=1b", ...]), for warmup + steps optimizer
    steps with a tokens/s record after every step, no validation or checkpoint before the end, no
    logger but the metrics file; `overrides` last, so a user's keys win (trainer.devices too:
    `devices` is only the default)."""
    total = warmup + steps
    return [sys.executable, "-m", "llm.cli.train", *(choices or []), f"trainer.devices={devices}", f"budget.steps={total}",
            "budget.tokens=null", "budget.flops=null", "budget.tokens_per_param=null", "trainer.log_every=1",
            f"trainer.val_every={total}", f"trainer.checkpoint_every={total}", "data.val_batches=1",
            "trainer.progress_bar=false", "logger=none", *overrides, f"hydra.run.dir={run_dir}"]


def measure(metrics: list[dict], summary: dict, warmup: int, peak: Peak) -> dict:
    """Tokens/s (median of the per-step records after `warmup` steps) and MFU against `peak`
    per device times the run's ranks."""
    rates = [r["perf/tokens_per_s"] for r in metrics
             if isinstance(r.get("perf/tokens_per_s"), (int, float)) and (r.get("step") or 0) > warmup]
    if not rates:
        raise RuntimeError(f"no perf/tokens_per_s record after step {warmup} in the run's metrics.jsonl")
    world = int(summary.get("world_size") or 1)
    tokens_per_s = statistics.median(rates)
    flops_per_token = float(summary["flops_per_token"])
    return {"tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / world, "ranks": world,
            "steps_timed": len(rates), "flops_per_token": flops_per_token, "params": summary.get("N"),
            "tokens_per_step": summary.get("tokens_per_step"), "mfu": tokens_per_s * flops_per_token / (peak.flops * world),
            "peak_flops_per_device": peak.flops, "peak_source": peak.source,
            "peak_memory_mib_per_rank": summary.get("peak_memory_mib"), "final_train_loss": summary.get("train/loss")}


def mfu_run(overrides: list[str], steps: int, warmup: int, out_dir: Path, choices: Optional[list[str]] = None) -> dict:
    """One llm-train run (see `train_command`; on every visible CUDA GPU, else one process) and
    its `measure` against the peak of the device and compute dtype the run's own config chose."""
    from omegaconf import OmegaConf

    devices = torch.cuda.device_count() or 1
    run_dir = out_dir / "run"
    command = train_command(overrides, steps, warmup, devices, run_dir, choices)
    log.info(f"running: llm-train {' '.join(command[3:-1])}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 2:  # llm-train refused the config: its reasons, as bench's own (exit 2)
        from llm.config import ConfigError

        problems = [line.strip()[2:] for line in result.stderr.splitlines() if line.strip().startswith("- ")]
        raise ConfigError([f"llm-train {' '.join(overrides)}: {p}" for p in problems] or [result.stderr.strip()[-2000:]])
    if result.returncode:
        raise RuntimeError(f"llm-train failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    trainer = OmegaConf.load(run_dir / ".hydra" / "config.yaml").trainer  # what the run composed (plain YAML)
    precision = str(trainer.precision)
    cuda = torch.cuda.is_available() and trainer.accelerator != "cpu"
    peak = device_peak(torch.device("cuda" if cuda else "cpu"), compute_dtype(precision))
    row = measure(read_metrics(run_dir / "metrics.jsonl"), summary, warmup, peak)
    return {**row, "train_command": " ".join(["llm-train", *command[3:-1]]), "choices": choices or [],
            "overrides": overrides, "precision": precision, "steps": steps, "warmup": warmup,
            "device": torch.cuda.get_device_name() if cuda else cpu_name(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "run_dir": str(run_dir)}


def markdown(row: dict, command: str) -> list[str]:
    """The block to paste: a heading naming the machine, the command, and one table row."""
    gpus = f"{row['ranks']}x {row['device']}"
    cuda = f", CUDA {row['cuda']}" if row["cuda"] else ""
    memory = row["peak_memory_mib_per_rank"]
    return [f"#### Training MFU on {gpus} (torch {row['torch']}{cuda})", "",
            f"`{command}` (median of {row['steps_timed']} steps after {row['warmup']} warm-up steps; the "
            "llm-train command is in bench_mfu.json)", "",
            "| parameters | ranks | precision | tokens/step | tokens/s | tokens/s per device | MFU | peak memory per rank |",
            "|---:|---:|---|---:|---:|---:|---:|---:|",
            f"| {row['params']:,} | {row['ranks']} | {row['precision']} | {row['tokens_per_step']:,} | "
            f"{row['tokens_per_s']:,.0f} | {row['tokens_per_s_per_device']:,.0f} | **{row['mfu']:.1%}** | "
            f"{memory:,.0f} MiB |", "",
            f"MFU = tokens/s x {row['flops_per_token']:.3g} FLOPs/token (6N + attention) / (ranks x "
            f"{flops_rate(row['peak_flops_per_device'])}; {row['peak_source']})."]


def flops_rate(flops: float) -> str:
    """"989.0 TFLOP/s", "66.9 GFLOP/s"."""
    return f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.1f} GFLOP/s"
