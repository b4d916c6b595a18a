"""StdlibCorpus: the Python standard library's own source, a corpus every machine already has."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from llm.data.files import Entry, FileCorpus

# Directories never walked: tests would dominate the corpus, installed packages vary by machine.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: Path) -> list[Entry]:
    """Every .py file under `root` outside the excluded directories, minus test_*.py."""
    entries = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]
        for name in names:
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(directory) / name
                entries.append((path.relative_to(root).as_posix(), path))
    return entries


class StdlibCorpus(FileCorpus):
    """The .py files of this interpreter's standard library, tests excluded.

    The default `max_bytes` (8 MB) keeps a default run to minutes on a 2-core CPU. The content
    depends on the Python version installed, which the fingerprint captures.
    """

    def __init__(self, val_fraction: float = 0.05, max_bytes: int | None = 8_000_000,
                 root: str | None = None):
        self.root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise FileNotFoundError(f"standard library directory not found: {self.root}")
        # The root itself is left out of the settings: the same files elsewhere are the same data.
        super().__init__("stdlib", stdlib_files(self.root), val_fraction, max_bytes,
                         settings={"corpus": "stdlib"})
