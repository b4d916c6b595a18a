"""RunDir: every file name of a run directory, in one place.

A run directory is what `llm-train` leaves behind and what every other command reads
(`llm-scaling`, `llm-dashboard`, `llm-eval`, `llm-generate`, `llm-hf`, resume, init_from):

    <run>/run.json          the unresolved config, group choices and overrides (resume reads it)
    <run>/config.yaml       the resolved, redacted config (for people)
    <run>/summary.json      status, N, D, C, final metrics (sweeps, fits and dashboards read it)
    <run>/metrics.jsonl     one record per logging step
    <run>/samples.jsonl     sampled completions (PPO, GRPO, llm-eval)
    <run>/tokenizer.json    the tokenizer the run trained with
    <run>/chat_template.jinja  how the run rendered conversations (post-training runs that read them)
    <run>/train.log         what the console showed (Hydra's job log)
    <run>/checkpoints/      last.ckpt, step-N.ckpt, best.ckpt, merged.ckpt (LoRA)
    <run>/branches/<end>/   WSD decay branches, each a run directory of its own

This module imports nothing of the project, so anything may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # a Jinja chat template, as Hugging Face tokenizer folders keep it
LOG_FILE = "train.log"
LOCK_FILE = ".lock"
CHECKPOINT_DIR = "checkpoints"
BRANCH_DIR = "branches"
LAST = "last.ckpt"
BEST = "best.ckpt"  # a link to the kept checkpoint with the lowest val/loss
MERGED = "merged.ckpt"  # a LoRA run's export: base + adapters as one ordinary checkpoint
META = "meta.pt"  # the non-tensor part of a sharded checkpoint (Lightning's name)
STEP_PREFIX = "step-"
CORRUPT = ".corrupt"  # suffix of a checkpoint set aside because it does not load


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created by asking)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES_FILE

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / BEST

    @property
    def merged_checkpoint(self) -> Path:
        return self.checkpoints / MERGED

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_checkpoint(step)

    def branch(self, end_step: int) -> RunDir:
        """The run directory of the WSD branch that decays to `end_step`."""
        return RunDir(self.path / BRANCH_DIR / f"{end_step:08d}")

    def is_run(self) -> bool:
        """Whether llm-train wrote this directory (it has a run.json)."""
        return self.run_file.is_file()


def step_checkpoint(step: int) -> str:
    """The file name of the checkpoint kept at optimizer step `step`."""
    return f"{STEP_PREFIX}{step:08d}.ckpt"


def branch_checkpoint(step: int) -> str:
    """The stable-phase checkpoint a WSD branch starts from."""
    return f"stable-{step:08d}.ckpt"
