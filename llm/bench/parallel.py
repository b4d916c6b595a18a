"""Parallelism benchmark: the same model and per-process batch under several `parallelism`
options, each a real `llm-train` run, compared with `single` in the same invocation.

Pipeline options name their schedule and, optionally, micro-batches after colons, e.g.
`bench.parallel=[pp:gpipe,pp:1f1b:8,pp:interleaved_1f1b]` (two ranks, 4 micro-batches unless
given, 2 virtual stages per rank for the interleaved and zero-bubble schedules). With any pipeline option a
one-stage pipeline (`pp1`: one process, the same micro-batches, no bubble) is run as well, and
each pipeline row gets its schedule's theoretical bubble and the measured one: the fraction of
the p ranks' time not spent as the one-stage pipeline spends it, 1 - (tokens/s / tokens/s of pp1) / p
(communication and imbalance count as bubble)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

INTERLEAVED = ("interleaved_1f1b", "looped_bfs", "interleaved_zb")


def option_overrides(option: str) -> list[str]:
    """`parallelism=...` overrides of a benchmark option: `ddp`, `fsdp`, ..., or `pp:<schedule>`,
    `pp1` (a one-stage pipeline)."""
    if option.startswith("pp1"):  # pp1 or pp1:<microbatches>
        return ["parallelism=pp", "parallelism.pipeline.stages=1", "parallelism.pipeline.schedule=gpipe",
                f"parallelism.pipeline.microbatches={microbatches_of(option)}"]
    name, _, schedule = option.partition(":")
    if not schedule:
        return [f"parallelism={name}"]
    schedule = schedule.split(":")[0]
    extra = ["parallelism.pipeline.stages_per_rank=2"] if schedule in INTERLEAVED else []
    return [f"parallelism={name}", f"parallelism.pipeline.schedule={schedule}",
            f"parallelism.pipeline.microbatches={microbatches_of(option)}", *extra]


def microbatches_of(option: str) -> int:
    parts = option.split(":")
    return int(parts[-1]) if parts[-1].isdigit() else 4  # conf/parallelism/pp.yaml's default


def run_option(option: str, devices: int, overrides: list[str], steps: int, out_dir: Path) -> dict:
    run_dir = out_dir / option.replace(":", "-")
    command = [sys.executable, "-m", "llm.cli.train", *overrides, *option_overrides(option),
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
    references = sorted({f"pp1:{microbatches_of(o)}" for o in options if o.startswith("pp:")} - set(options))
    for option in [*references, *options]:
        devices = 1 if option.startswith("pp1") else ranks
        log.info(f"parallelism={option} on {devices} rank(s) ...")
        rows.append(run_option(option, devices, overrides, steps, out_dir))
    for row in rows:
        row["vs_single"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    for row in rows:
        if row["option"].startswith("pp:"):
            reference = next(r for r in rows if r["option"] == f"pp1:{microbatches_of(row['option'])}")
            add_bubble(row, reference, ranks)
            log.info(f"{row['option']}: bubble {row['bubble_measured']:.1%} measured, "
                     f"{row['bubble_theory']:.1%} in theory ({row['microbatches']} micro-batches)")
    return rows


def add_bubble(row: dict, reference: dict, ranks: int) -> None:
    from llm.parallel.pipeline import SCHEDULES, bubble_fraction

    schedule = row["option"].split(":")[1]
    microbatches = microbatches_of(row["option"])
    per_rank = 2 if schedule in INTERLEAVED or SCHEDULES[schedule][1] == "v" else 1
    row["microbatches"] = microbatches
    row["bubble_theory"] = bubble_fraction(schedule, ranks, microbatches, per_rank)
    row["bubble_measured"] = 1 - row["tokens_per_s"] / reference["tokens_per_s"] / ranks
