"""A run's checkpoints on disk: which exist, newest first, and the newest that loads.

`<run>/checkpoints/` holds last.ckpt, the kept step-<N>.ckpt, best.ckpt (a link) and, after a
crash in the middle of a sharded save, `.last.ckpt.old` (the previous last.ckpt, still whole).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from llm.checkpoint.meta import checkpoint_problem
from llm.run.layout import CORRUPT, LAST, META, STEP_PREFIX, RunDir


def step_files(directory: str | Path) -> list[tuple[int, Path]]:
    """The step-<N>.ckpt checkpoints in `directory`, as (N, path), unordered."""
    found = []
    for path in Path(directory).glob(f"{STEP_PREFIX}*.ckpt"):
        digits = path.name[len(STEP_PREFIX):-len(".ckpt")]
        if digits.isdigit():
            found.append((int(digits), path))
    return found


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """A run's checkpoints, newest first: last.ckpt, the previous one mid-swap, then step-*.ckpt."""
    directory = RunDir(run_dir).checkpoints
    found = [path for path in (directory / LAST, directory / f".{LAST}.old") if path.exists()]
    return found + [path for _, path in sorted(step_files(directory), reverse=True)]


def last_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The run's newest whole checkpoint (after a crash mid-swap, the previous one), unread."""
    for path in checkpoint_candidates(run_dir):
        if path.is_file() or (path / META).is_file():
            return path
    return None


def newest_loadable_checkpoint(run_dir: str | Path, set_aside: bool = True) -> tuple[Optional[Path], list[dict]]:
    """The newest checkpoint of the run that loads, and the ones tried before it that did not
    ({"path", "error"}), which are renamed `<name>.corrupt` when `set_aside` (rank zero), when
    the temporary files of writes that never finished are also removed."""
    corrupt = []
    if set_aside:
        for torn in RunDir(run_dir).checkpoints.glob(".*.tmp*"):
            remove_path(torn)
    for path in checkpoint_candidates(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, corrupt
        corrupt.append({"path": str(path), "error": problem})
        if set_aside and path.exists():
            aside = path.with_name(path.name.lstrip(".") + CORRUPT)
            remove_path(aside)
            path.rename(aside)
    return None, corrupt


def remove_path(path: Path) -> None:
    """Remove a checkpoint whatever it is: a link, a file, or a sharded directory."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
