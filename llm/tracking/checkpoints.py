"""Checkpoints of a run: `<run_dir>/checkpoints/last.ckpt`, replaced atomically.

A single-process or DDP checkpoint is one file (written by AtomicCheckpointIO: temporary file,
fsync, rename). An FSDP/TP checkpoint is a `torch.distributed.checkpoint` directory of shards,
written to a temporary directory by every rank and then swapped in by rank 0, so `last.ckpt` is
always either the previous whole checkpoint or the new whole one.
"""

from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

LAST = "last.ckpt"
META = "meta.pt"  # the non-tensor part of a distributed checkpoint (Lightning's name)


class PeriodicCheckpoint(Callback):
    def __init__(self, dirpath: str | Path, every_n_steps: int, branch_starts: tuple[int, ...] = ()):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.branch_starts = set(branch_starts)  # WSD branches leave the stable phase here
        self.saved_step = -1

    def save(self, trainer: pl.Trainer, name: str = LAST) -> None:
        if trainer.global_step == self.saved_step and name == LAST:
            return
        if name == LAST:
            self.saved_step = trainer.global_step
        final = self.dirpath / name
        if not getattr(trainer.lightning_module.parallelism, "sharded_checkpoints", False):
            trainer.save_checkpoint(final)
            return
        tmp, old = self.dirpath / f".{name}.tmp", self.dirpath / f".{name}.old"
        if trainer.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        trainer.strategy.barrier("checkpoint-start")
        trainer.save_checkpoint(tmp)  # every rank writes its shards; ends with a barrier
        if trainer.is_global_zero:
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        trainer.strategy.barrier("checkpoint-swapped")

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.save(trainer)
        if trainer.global_step in self.branch_starts:
            self.save(trainer, branch_checkpoint(trainer.global_step))


def branch_checkpoint(step: int) -> str:
    return f"stable-{step:08d}.ckpt"


def last_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The run's last whole checkpoint (after a crash mid-swap, the previous one)."""
    directory = Path(run_dir) / "checkpoints"
    for path in (directory / LAST, directory / f".{LAST}.old"):
        if path.is_file() or (path / META).is_file():
            return path
    return None


def load_checkpoint_meta(path: str | Path) -> dict:
    """The non-tensor part of a checkpoint (global step, our model config, loop state)."""
    path = Path(path)
    file = path / META if path.is_dir() else path
    return torch.load(file, map_location="cpu", weights_only=True, mmap=not path.is_dir())


def checkpoint_step(path: str | Path) -> int:
    return int(load_checkpoint_meta(path)["global_step"])


def consolidate(checkpoint_dir: str | Path, out_file: str | Path) -> Path:
    """Gather a sharded (FSDP/TP) checkpoint into one ordinary Lightning checkpoint file, for
    export and single-device use."""
    from lightning_fabric.utilities.load import _load_distributed_checkpoint

    from llm.tracking.checkpoint_io import atomic_torch_save

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / META).is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a sharded checkpoint directory (no {META})")
    checkpoint = _load_distributed_checkpoint(checkpoint_dir)  # full tensors, keyed like a file checkpoint
    # Optimizer states are saved per optimizer (`optimizer_0`, ...) keyed by parameter name.
    names = sorted((k for k in checkpoint if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in names]
    atomic_torch_save(checkpoint, out_file)
    return Path(out_file)


def load_plain_model(path: str | Path) -> torch.nn.Module:
    """A plain `Transformer` with the weights of a checkpoint file (single-process, DDP, or
    consolidated FSDP/TP), built from the model config the checkpoint carries."""
    from llm.model import AttentionConfig, ModelConfig, PositionConfig, Transformer

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = dict(checkpoint["llm"]["model_config"])
    saved["attention"] = AttentionConfig(**saved["attention"])
    saved["position"] = PositionConfig(**saved["position"])
    model = Transformer(ModelConfig(**{f.name: saved[f.name] for f in fields(ModelConfig) if f.name in saved}))
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state, strict=False)
    missing = set(model.state_dict()) - set(state) - ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {sorted(missing)[:5]} for this architecture")
    return model
