"""Which checkpoint a `checkpoint=` / `init_from=` value names, found without loading it.

A value may be:
- a run directory: its final model, `checkpoints/merged.ckpt` after LoRA training (the adapters
  folded into the base), else `checkpoints/last.ckpt` (a file, or a sharded directory);
- a run id: a run directory under the runs directory (`paths.runs_dir`);
- a checkpoint file (`torch.save`, e.g. written by `llm-consolidate` or `llm-hf import`), or a
  folder holding one as `model.ckpt` (as `llm-hf import <hf folder> <dir>/model.ckpt` leaves it);
- a sharded FSDP/TP checkpoint directory (a `torch.distributed.checkpoint` directory with meta.pt);
- a Hugging Face transformers model folder (config.json and weights), read by `llm.interop.hf`.
Anything else is a ConfigError naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from llm.checkpoint.find import last_checkpoint
from llm.checkpoint.meta import is_sharded, load_meta
from llm.config import ConfigError
from llm.run.layout import CHECKPOINT_DIR, LAST, TOKENIZER_FILE, RunDir

Kind = Literal["file", "sharded", "hf"]
HF_CONFIG = "config.json"
IMPORTED = "model.ckpt"  # a folder holding one checkpoint file by this name (and its tokenizer.json) stands for it
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
ALLOWED = ("a run directory, a run id, a checkpoint file (or a folder holding model.ckpt), a sharded checkpoint "
           "directory (with meta.pt), or a Hugging Face model folder (config.json + weights)")


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint and the run directory it belongs to (None outside a run)."""

    path: Path
    run_dir: Optional[Path]
    kind: Kind = "file"

    @property
    def run_id(self) -> Optional[str]:
        return self.run_dir.name if self.run_dir else None

    @property
    def step(self) -> int:
        """The optimizer steps the checkpoint had taken (0 for a Hugging Face folder or an import)."""
        if self.kind == "hf":
            return 0
        return int(load_meta(self.path).get("global_step", 0))


def resolve(value: Optional[str | Path], runs_dir: str | Path, key: str = "checkpoint") -> CheckpointRef:
    """The checkpoint `value` names (module docstring), without loading it; ConfigError naming `key`."""
    if value is None or str(value).strip() == "":
        raise ConfigError([f"{key}: required; give {key}=<run directory | run id | checkpoint file | sharded "
                           "checkpoint directory | Hugging Face folder>"])
    text = str(value)
    path = Path(text).expanduser()
    if not path.exists() and (Path(runs_dir) / text).is_dir():
        path = Path(runs_dir) / text
    if not path.exists():
        raise ConfigError([f"{key}={text!r}: no such checkpoint file, run directory, or run id under {runs_dir}; "
                           f"allowed: {ALLOWED}"])
    path = path.resolve()
    if is_sharded(path):
        return CheckpointRef(path, _run_of(path), "sharded")
    if path.is_file():
        return CheckpointRef(path, _run_of(path), "file")
    run = RunDir(path)
    if run.checkpoints.is_dir() or run.is_run():
        if run.merged_checkpoint.is_file():
            return CheckpointRef(run.merged_checkpoint, path, "file")
        last = last_checkpoint(path)
        if last is None:
            raise ConfigError([f"{key}={text!r}: the run directory {path} has no {CHECKPOINT_DIR}/{LAST} yet (a "
                               "run saves one every trainer.checkpoint_every steps and at the end)"])
        return CheckpointRef(last, path, "sharded" if is_sharded(last) else "file")
    if (path / IMPORTED).is_file() and not (path / HF_CONFIG).is_file():  # what `llm-hf import <hf> <dir>/model.ckpt` writes
        return CheckpointRef(path / IMPORTED, None, "file")
    if (path / HF_CONFIG).is_file():
        if not any((path / name).is_file() for name in HF_WEIGHTS):
            raise ConfigError([f"{key}={text!r}: the Hugging Face folder {path} has no weights "
                               f"({' or '.join(HF_WEIGHTS[:2])}, whole or sharded)"])
        return CheckpointRef(path, None, "hf")
    raise ConfigError([f"{key}={text!r}: {path} is a directory without {CHECKPOINT_DIR}/{LAST}, meta.pt, "
                       f"{IMPORTED} or {HF_CONFIG}; allowed: {ALLOWED}"])


def _run_of(checkpoint: Path) -> Optional[Path]:
    """The run directory of `<run>/checkpoints/<checkpoint>`, recognised by the files a run leaves."""
    run = RunDir(checkpoint.parent.parent)
    if checkpoint.parent.name == CHECKPOINT_DIR and (run.run_file.exists() or run.tokenizer.exists()):
        return run.path
    return None


def tokenizer_file(ref: CheckpointRef, tokenizer: Optional[str | Path] = None, key: str = "tokenizer.path") -> Path:
    """The tokenizer.json to use with `ref`: `tokenizer` when given (a file, or a folder holding
    one), else the Hugging Face folder's, the run's, or the one beside the checkpoint file."""
    if tokenizer:
        path = Path(tokenizer).expanduser()
        path = path / TOKENIZER_FILE if path.is_dir() else path
        if not path.is_file():
            raise ConfigError([f"{key}={str(tokenizer)!r}: no such tokenizer file"])
        return path
    near = [ref.path] if ref.kind == "hf" else [d for d in (ref.run_dir, ref.path.parent) if d is not None]
    for folder in near:
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    raise ConfigError([f"{key}: required, as {ref.path} is not inside a run directory with a {TOKENIZER_FILE} "
                       f"(nor has one beside it); give {key}=path/to/{TOKENIZER_FILE}"])

