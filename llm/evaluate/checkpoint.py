"""Which checkpoint a `checkpoint=` value names, and loading it for inference.

A value is a run directory (its `checkpoints/last.ckpt`), a run id under the runs directory, or a
checkpoint file. A sharded FSDP/TP checkpoint (a directory) cannot be loaded by one process; it
is refused with the `llm-consolidate` command that gathers it into a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from llm.config import ConfigError
from llm.tracking.checkpoints import LAST, META, checkpoint_step, last_checkpoint

if TYPE_CHECKING:
    from llm.tokenizer import Tokenizer

CONSOLIDATED = "last.consolidated.ckpt"  # what `llm-consolidate <run>/checkpoints/last.ckpt` writes by default


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint file and the run directory it belongs to (None for a file outside a run)."""

    path: Path
    run_dir: Optional[Path]

    @property
    def run_id(self) -> Optional[str]:
        return self.run_dir.name if self.run_dir else None

    @property
    def step(self) -> int:
        """The optimizer steps the checkpoint had taken (its `global_step`)."""
        return checkpoint_step(self.path)


def _sharded(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file()


def _consolidate_hint(key: str, value: str, sharded: Path) -> str:
    out = sharded.with_name(CONSOLIDATED)
    return (f"{key}={value!r}: {sharded} is a sharded FSDP/TP checkpoint (a directory), which one process cannot load; "
            f"gather it into one file first: `llm-consolidate {sharded}` (writes {out}, which {key}=<run> "
            "then picks up)")


def _run_of(file: Path) -> Optional[Path]:
    """The run directory of `<run>/checkpoints/<file>`, recognised by the files a run leaves."""
    run = file.parent.parent
    if file.parent.name == "checkpoints" and any((run / name).exists() for name in ("run.json", "tokenizer.json")):
        return run
    return None


def resolve_checkpoint(value: Optional[str], runs_dir: str | Path, key: str = "checkpoint") -> CheckpointRef:
    """The checkpoint file `value` names, without loading it; ConfigError naming `key` otherwise."""
    if value is None or str(value).strip() == "":
        raise ConfigError([f"{key}: required; give {key}=<run directory | run id | checkpoint file>"])
    value = str(value)
    path = Path(value).expanduser()
    if not path.exists() and (Path(runs_dir) / value).is_dir():
        path = Path(runs_dir) / value
    if not path.exists():
        raise ConfigError([f"{key}={value!r}: no such checkpoint file, run directory, or run id under {runs_dir}"])
    path = path.resolve()
    if _sharded(path):
        if path.name == LAST and (path.parent / CONSOLIDATED).is_file():
            return _consolidated(key, value, path, _run_of(path))
        raise ConfigError([_consolidate_hint(key, value, path)])
    if path.is_file():
        return CheckpointRef(path, _run_of(path))
    last = last_checkpoint(path)  # a run directory
    if last is None:
        raise ConfigError([f"{key}={value!r}: {path} is a directory without checkpoints/{LAST}; "
                           "allowed: a run directory, a run id, or a checkpoint file"])
    if _sharded(last):
        if (last.parent / CONSOLIDATED).is_file():
            return _consolidated(key, value, last, path)
        raise ConfigError([_consolidate_hint(key, value, last)])
    return CheckpointRef(last, path)


def _consolidated(key: str, value: str, sharded: Path, run_dir: Optional[Path]) -> CheckpointRef:
    """The consolidated file beside a sharded checkpoint, unless training has moved on since."""
    consolidated = sharded.parent / CONSOLIDATED
    if consolidated.stat().st_mtime < (sharded / META).stat().st_mtime:
        raise ConfigError([_consolidate_hint(key, value, sharded) + f"; {consolidated} is older than it"])
    return CheckpointRef(consolidated, run_dir)


def tokenizer_file(ref: CheckpointRef, tokenizer: Optional[str], key: str = "tokenizer.path") -> Path:
    """The tokenizer.json to use: `tokenizer` if given, else the run's own; ConfigError otherwise."""
    if tokenizer:
        path = Path(tokenizer).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError([f"{key}={tokenizer!r}: no such tokenizer file"])
        return path
    if ref.run_dir is None or not (ref.run_dir / "tokenizer.json").is_file():
        raise ConfigError([f"{key}: required, as {ref.path} is not inside a run directory with a tokenizer.json; "
                           f"give {key}=path/to/tokenizer.json"])
    return ref.run_dir / "tokenizer.json"


def resolve_device(device: str, quantize: str = "none") -> torch.device:
    """`auto` is CUDA when present, else the CPU; int8 models always run on the CPU (its kernels)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and quantize == "none" else "cpu")
    return torch.device(device)


def load_model(ref: CheckpointRef, device: torch.device) -> nn.Module:
    """The checkpoint's plain `Transformer`, in eval mode on `device`."""
    from llm.tracking.checkpoints import checkpoint_problem, load_plain_model

    problem = checkpoint_problem(ref.path)
    if problem is None and "llm" not in torch.load(ref.path, map_location="cpu", weights_only=True, mmap=True):
        problem = "no model config in it (it was not written by llm-train)"
    if problem:
        raise ConfigError([f"checkpoint {ref.path}: not a readable checkpoint ({problem}); give a run directory, a run id, "
                           "or a checkpoint file written by llm-train"])
    return load_plain_model(ref.path).to(device).eval()


def load_tokenizer(path: Path) -> Tokenizer:
    from llm.tokenizer import Tokenizer

    return Tokenizer.load(path)
