"""Parallelism benchmark: the same model and per-process batch under several `parallelism`
options, each a real `llm-train` run, compared with `single` in the same invocation."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def run_option(option: str, devices: int, overrides: list[str], steps: int, out_dir: Path) -> dict:
    run_dir = out_dir / option
    command = [sys.executable, "-m", "llm.cli.train", *overrides, f"parallelism={option}",
               f"trainer.devices={devices}", f"budget.steps={steps}", "budget.tokens=null", "budget.flops=null",
               "budget.tokens_per_param=null", f"trainer.val_every={steps}", f"trainer.checkpoint_every={steps}",
               "logger=none", "trainer.progress_bar=false", "data.global_batch_size=null", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"parallelism={option} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"option": option, "ranks": devices, "tokens_per_s": summary["tokens_per_s"],
            "peak_memory_mib_per_rank": summary["peak_memory_mib"], "val_loss": summary.get("val/loss")}


def benchmark_parallel(options: list[str], overrides: list[str], steps: int, out_dir: Path, ranks: int = 2) -> list[dict]:
    """tokens/s and peak memory per rank of each option with `ranks` processes, relative to single."""
    rows = [run_option("single", 1, overrides, steps, out_dir)]
    for option in options:
        log.info(f"parallelism={option} on {ranks} ranks ...")
        rows.append(run_option(option, ranks, overrides, steps, out_dir))
    for row in rows:
        row["vs_single"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows
