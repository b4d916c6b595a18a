"""Weights & Biases conventions: mode resolution (never an interactive login) and the logger."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Optional

from llm.config import ConfigError


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc"))).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """auto -> online with credentials, else offline. Online without credentials is an error
    here, before any work, instead of a login prompt later."""
    env = os.environ.get("WANDB_MODE")
    if mode == "auto" and env in ("online", "offline", "disabled"):
        return env
    if mode == "auto":
        return "online" if has_credentials() else "offline"
    if mode == "online" and not has_credentials():
        raise ConfigError(["logger.mode='online': no W&B credentials; run `wandb login`, set WANDB_API_KEY, "
                           "or use logger.mode=offline (sync later with `wandb sync`)"])
    return mode


def wandb_logger(cfg: Any, run_id: str, run_dir: Path, job_type: str, name: str, tags: list[str],
                 group: Optional[str], announce: bool = True) -> Any:
    from pytorch_lightning.loggers import WandbLogger

    mode = resolve_mode(cfg.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(
        project=cfg.project, entity=cfg.entity, id=run_id, name=name, group=group, job_type=job_type,
        tags=[*tags, *cfg.tags], notes=cfg.notes, mode=mode, save_dir=str(run_dir), resume="allow",
        log_model=bool(cfg.log_checkpoints),
    )
    if announce:  # rank 0: tokens and FLOPs as x-axes, the best validation loss as the summary
        run = logger.experiment
        for axis in ("trainer/tokens", "trainer/flops"):
            run.define_metric(axis)
        for pattern in ("train/*", "val/*", "perf/*"):
            run.define_metric(pattern, step_metric="trainer/tokens")
        run.define_metric("val/loss", summary="min")
    if mode == "offline" and announce:
        print(f"W&B is offline; to upload this run later: wandb sync {run_dir / 'wandb'}")
    return logger
