"""The run: one id ties together the run directory, checkpoints, resolved config and W&B run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

GROUPS = ("tokenizer", "model", "attention", "position", "data", "optim", "schedule", "trainer",
          "budget", "parallelism", "posttrain", "logger", "experiment")


def run_id(run_dir: Path, runs_dir: Path) -> str:
    """The run directory relative to the runs root, with '/' -> '-' (a valid W&B id)."""
    try:
        rel = run_dir.resolve().relative_to(runs_dir.resolve())
    except ValueError:
        rel = Path(run_dir.name)
    return "-".join(rel.parts)


def group_choices(cfg: DictConfig | None = None) -> dict[str, str]:
    """The option chosen in every config group (from Hydra), e.g. {'attention': 'gqa', ...}."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    except (ValueError, ImportError):
        return {}
    return {g: str(choices[g]) for g in GROUPS if g in choices and choices[g] is not None}


def git_state(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit or None, "dirty": dirty} if commit else {}


def write_json(path: Path, data: dict) -> None:
    """Atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def resolved_config(cfg: DictConfig, resolve: bool = True) -> dict:
    """The run's config as plain data, without Hydra's own `hydra` node."""
    return {k: OmegaConf.to_container(cfg[k], resolve=resolve) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "hydra"}
