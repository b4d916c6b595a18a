"""The lock a run holds on its directory: two `llm-train` processes never share one.

`<run>/.lock` is locked with `flock` for as long as the owning process lives: the kernel releases
it when the process ends, however it ends (kill -9 included), so a lock is never left held by a
dead process. The file also says who holds it (pid, host, start time); when it names an owner but
is not locked, that owner died without finishing (a stale lock), which is reported and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO, Optional

from llm.config import ConfigError
from llm.run.layout import RunDir

log = logging.getLogger(__name__)


class RunLock:
    """Exclusive ownership of a run directory by this process (released when it exits)."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.lock
        self.run_dir = run_dir.path
        self._file: Optional[IO[str]] = None

    def acquire(self) -> None:
        """Lock the directory, or raise ConfigError naming the process that holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise ConfigError([f"hydra.run.dir={self.run_dir}: another llm-train ({_describe(owner(self.path))}) "
                                   "is running in this directory; wait for it to end, or give this run another "
                                   "directory (nothing was written)"]) from e
            # A filesystem without flock (some network mounts): run unlocked rather than not at all.
            log.warning(f"{self.path}: cannot lock the run directory ({e.strerror}); make sure no other llm-train "
                        "uses it")
        previous = owner(self.path)
        if previous:
            log.warning(f"{self.run_dir}: a stale lock of {_describe(previous)} was left by a run that did not "
                        "finish (the process is gone); taking it over")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        """Empty the lock file (a finished run left no owner) and unlock it."""
        if self._file is None:
            return
        try:
            self._file.seek(0)
            self._file.truncate()
        finally:
            self._file.close()  # closing the last descriptor releases the flock
            self._file = None


def owner(path: Path) -> Optional[dict]:
    """Who the lock file says holds it (pid, host, since), or None for an empty or foreign file."""
    try:
        text = path.read_text(encoding="utf-8").strip()
        data = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "pid" in data else None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "a process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host', '?')}, since {since}"
