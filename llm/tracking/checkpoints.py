"""Checkpoints of a run: `<run_dir>/checkpoints/last.ckpt`, the last K, and the best.

A single-process or DDP checkpoint is one file (written by AtomicCheckpointIO: temporary file,
fsync, verify, rename). An FSDP/TP checkpoint is a `torch.distributed.checkpoint` directory of
shards, written to a temporary directory by every rank and then swapped in by rank 0. Either way
`last.ckpt` is always a whole checkpoint or absent, never a torn one.

Before a new `last.ckpt` is written, the previous one is renamed `step-<its step>.ckpt`; the
newest `trainer.keep_last` checkpoints are kept (last.ckpt counts as one) plus the best by
`val/loss`, which `best.ckpt` (a symlink) names. On resume, `newest_loadable_checkpoint` tries
them newest first and sets aside any that does not load as `<name>.corrupt`.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

LAST = "last.ckpt"
BEST = "best.ckpt"  # a symlink to the kept checkpoint with the lowest val/loss
META = "meta.pt"  # the non-tensor part of a distributed checkpoint (Lightning's name)
STEP_PREFIX = "step-"
CORRUPT = ".corrupt"  # suffix of a checkpoint set aside because it does not load


def step_checkpoint(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}.ckpt"


class PeriodicCheckpoint(Callback):
    """Saves `last.ckpt` every `every_n_steps` optimizer steps (and WSD branch starts), keeping
    the newest `keep_last` checkpoints and the best by val/loss.

    `vet(trainer)` runs before each periodic save and may raise to refuse it: the loss guard
    uses it so that no checkpoint ever holds non-finite weights.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, branch_starts: tuple[int, ...] = (),
                 keep_last: int = 2, vet: Optional[Callable[[pl.Trainer], None]] = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.branch_starts = set(branch_starts)  # WSD branches leave the stable phase here
        self.keep_last = keep_last
        self.vet = vet
        self.saved_step = -1  # the step of last.ckpt, when this process wrote it
        self.validated: Optional[tuple[int, float]] = None  # (step, val/loss) of the latest validation
        self.best_step, self.best_val = -1, float("inf")

    def save(self, trainer: pl.Trainer, name: str = LAST) -> None:
        if trainer.global_step == self.saved_step and name == LAST:
            return
        final = self.dirpath / name
        rank_zero = trainer.is_global_zero
        if not getattr(trainer.lightning_module.parallelism, "sharded_checkpoints", False):
            if name == LAST and rank_zero:
                self._rotate()
            trainer.save_checkpoint(final)
        else:
            tmp, old = self.dirpath / f".{name}.tmp", self.dirpath / f".{name}.old"
            if rank_zero and tmp.exists():
                shutil.rmtree(tmp)
            trainer.strategy.barrier("checkpoint-start")
            trainer.save_checkpoint(tmp)  # every rank writes its shards; ends with a barrier
            if rank_zero:
                if name == LAST:
                    self._rotate()
                elif final.exists():
                    final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            trainer.strategy.barrier("checkpoint-swapped")
        if name == LAST:
            self.saved_step = trainer.global_step
            self._consider_best(rank_zero)
            if rank_zero:
                self._prune()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a fit may start from an older checkpoint (a rollback): read last.ckpt's step again
            self.saved_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        periodic = step % self.every_n_steps == 0 and step > 0 and step != self.saved_step
        if periodic and self.vet is not None:
            self.vet(trainer)
        if periodic:
            self.save(trainer)
        if step in self.branch_starts:
            self.save(trainer, branch_checkpoint(step))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or loss is None:
            return
        self.validated = (trainer.global_step, float(loss))
        self._consider_best(trainer.is_global_zero)

    def state_dict(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_val": self.best_val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("best_val", float("inf")) < self.best_val:  # a rollback's older state knows less
            self.best_step, self.best_val = state["best_step"], state["best_val"]

    def _consider_best(self, rank_zero: bool) -> None:
        """The checkpoint just saved is the best when its weights were just validated lowest."""
        if self.validated is None or self.validated[0] != self.saved_step or not self.validated[1] < self.best_val:
            return
        self.best_step, self.best_val = self.validated
        if rank_zero:
            _point(self.dirpath / BEST, LAST)

    def _rotate(self) -> None:
        """Rename last.ckpt to step-<its step>.ckpt, so the new last.ckpt replaces nothing."""
        last = self.dirpath / LAST
        if not last.exists():
            return
        step = self.saved_step if self.saved_step >= 0 else _readable_step(last)
        if step is None:  # unreadable: kept for inspection, out of the way
            _remove(last.with_name(LAST + CORRUPT))
            last.rename(last.with_name(LAST + CORRUPT))
            return
        kept = self.dirpath / step_checkpoint(step)
        _remove(kept)
        last.rename(kept)
        if step == self.best_step:
            _point(self.dirpath / BEST, kept.name)

    def _prune(self) -> None:
        older = sorted(_step_files(self.dirpath), reverse=True)
        for step, path in older[self.keep_last - 1:]:
            if step != self.best_step:
                _remove(path)


def _step_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob(f"{STEP_PREFIX}*.ckpt"):
        digits = path.name[len(STEP_PREFIX):-len(".ckpt")]
        if digits.isdigit():
            found.append((int(digits), path))
    return found


def _point(link: Path, target: str) -> None:
    """Make `link` a relative symlink to `target`, atomically."""
    tmp = link.with_name(f".{link.name}.tmp")
    _remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _readable_step(path: Path) -> Optional[int]:
    try:
        return checkpoint_step(path)
    except Exception:  # any unreadable checkpoint: torch raises several kinds
        return None


def branch_checkpoint(step: int) -> str:
    return f"stable-{step:08d}.ckpt"


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """A run's checkpoints, newest first: last.ckpt, the previous one mid-swap, then step-*.ckpt."""
    directory = Path(run_dir) / "checkpoints"
    found = [path for path in (directory / LAST, directory / f".{LAST}.old") if path.exists()]
    return found + [path for _, path in sorted(_step_files(directory), reverse=True)]


def last_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The run's newest whole checkpoint (after a crash mid-swap, the previous one), unread."""
    for path in checkpoint_candidates(run_dir):
        if path.is_file() or (path / META).is_file():
            return path
    return None


def checkpoint_problem(path: str | Path) -> Optional[str]:
    """Why the checkpoint at `path` cannot be resumed from, or None when it loads: a file must
    unpickle (safely) with its weights and step; a sharded directory needs its metadata and every
    shard file it names, at full length."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its index at the end
        return "not a whole checkpoint archive (cut short, or not written by torch.save)"
    try:
        meta = load_checkpoint_meta(path)
        if not path.is_dir() and "state_dict" not in meta:
            return "no model weights (state_dict) in it"
        if "global_step" not in meta:
            return "no global_step in it"
        if path.is_dir():
            from torch.distributed.checkpoint import FileSystemReader

            needed: dict[str, int] = {}
            for info in FileSystemReader(str(path)).read_metadata().storage_data.values():
                needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
            for name, size in sorted(needed.items()):
                have = (path / name).stat().st_size if (path / name).is_file() else None
                if have is None or have < size:
                    return f"shard {name} is {'missing' if have is None else f'{have} of {size} bytes'}"
    except Exception as e:  # torch.load raises several kinds on a torn or foreign file
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return None


def newest_loadable_checkpoint(run_dir: str | Path, set_aside: bool = True) -> tuple[Optional[Path], list[dict]]:
    """The newest checkpoint of the run that loads, and the ones tried before it that did not
    ({"path", "error"}), which are renamed `<name>.corrupt` when `set_aside` (rank zero), when
    the temporary files of writes that never finished are also removed."""
    corrupt = []
    if set_aside:
        for torn in (Path(run_dir) / "checkpoints").glob(".*.tmp*"):
            _remove(torn)
    for path in checkpoint_candidates(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, corrupt
        corrupt.append({"path": str(path), "error": problem})
        if set_aside and path.exists():
            aside = path.with_name(path.name.lstrip(".") + CORRUPT)
            _remove(aside)
            path.rename(aside)
    return None, corrupt


def require_same_model(path: str | Path, model_config: Any) -> None:
    """Refuse (ConfigError) a checkpoint written by a model of another shape than `model_config`;
    fields left None here (derived, e.g. the vocabulary from the tokenizer) are not compared."""
    from llm.config import ConfigError

    saved = (load_checkpoint_meta(path).get("llm") or {}).get("model_config")
    if saved is None:
        return
    mine, theirs = _flat(asdict(model_config)), _flat(saved)
    differ = [f"model.{k}={theirs[k]!r} there, {v!r} here" for k, v in mine.items()
              if v is not None and k in theirs and theirs[k] != v]
    if differ:
        raise ConfigError([f"checkpoint {path}: written by a model of another architecture ({'; '.join(differ)}); "
                           "resume with the run's own model settings, or start a new run"])


def _flat(node: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
