"""Checkpoint files that are either whole or absent, written through `llm.files.atomic_write`.

A sharded FSDP/TP checkpoint (a directory every rank writes into) cannot be one atomic file: the
PeriodicCheckpoint callback (llm.tracking.checkpoints) writes it to a temporary directory and
renames it into place instead.

A write that runs out of room (a full disk or quota, or a file larger than `ulimit -f` allows)
raises `NoSpace`, which says so, rather than torch's serialization error: the previous checkpoint
is still whole, and the run can be resumed once there is room.
"""

from __future__ import annotations

import errno
import resource
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import nn

from llm.checkpoint.load import PREFIX
from llm.files import atomic_write


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# What torch's C++ writers (a save to a path, the shards of torch.distributed.checkpoint) say of a
# failed write: the errno is lost, so the disk and the file-size limit are asked instead.
SHORT_WRITE = ("file write failed", "unexpected pos", "iostream error")
LOW_SPACE_BYTES = 64 * 2**20  # free space below this when a write failed: the disk was full


class NoSpace(Exception):
    """A checkpoint could not be written for lack of room; nothing was replaced. llm-train prints
    the message and exits 1 (summary.json: "failed")."""

    def __init__(self, path: str | Path, why: str):
        self.path = Path(path)
        super().__init__(f"no space left to write checkpoint {path} (disk full or file-size limit: {why})")


def no_space(error: BaseException, directory: str | Path) -> Optional[str]:
    """Why `error`, or an exception it arose from, is a write into `directory` that ran out of
    room (the system's words), or None when it is something else."""
    chain = list(causes(error))
    for e in chain:
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return e.strerror or errno.errorcode[e.errno]
    if any(isinstance(e, RuntimeError) and any(words in str(e) for words in SHORT_WRITE) for e in chain):
        return _out_of_room(Path(directory))
    return None


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, the exceptions it arose from, and the per-rank failures a torch.distributed
    checkpoint collects (`failures`: {rank: exception or (exception, traceback)})."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                todo += [x for x in (failure if isinstance(failure, tuple) else (failure,)) if isinstance(x, BaseException)]


def _out_of_room(directory: Path) -> Optional[str]:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"files are limited to {limit:,} bytes (ulimit -f)"
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    return f"{free:,} bytes free" if free < LOW_SPACE_BYTES else None


def verify_readable(path: Path) -> None:
    """The archive is whole and its index readable (tensors memory-mapped, not read)."""
    torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` so that a reader (or a resume after a crash) sees the old file or the
    whole new one. The new file is read back before it replaces the old: a write that the disk
    or filesystem silently cut short fails here, while the previous checkpoint is still in place.
    A write that runs out of room raises NoSpace (the temporary file is gone)."""
    try:
        with atomic_write(path, check=verify_readable) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        why = no_space(e, Path(path).parent)
        if why is None:
            raise
        raise NoSpace(path, why) from e


def save_network(model: nn.Module, path: str | Path, llm: Optional[dict[str, Any]] = None,
                 global_step: int = 0) -> Path:
    """An ordinary checkpoint of a plain network (Transformer or ValueModel), which every loader
    reads like a training checkpoint: Lightning's layout (`state_dict` with `model.` prefixes)
    and our `llm` dict (stage, value_head, parent, ...; model_config is the network's)."""
    meta = {"model_config": asdict(model.cfg), **(llm or {})}
    atomic_torch_save({"state_dict": {PREFIX + k: v for k, v in model.state_dict().items()},
                       "global_step": global_step, "llm": meta}, path)
    return Path(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin for single-file checkpoints: atomic saves, safe loads."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict:
        # Our checkpoints hold tensors and plain types only, so the safe loader always suffices.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
