"""What the console shows: our messages as plain lines, warnings and errors prefixed, libraries
only from WARNING up, and only rank zero's messages in a multi-process run.

The Hydra apps get these classes through their job logging (conf/hydra/job_logging/llm*.yaml,
which also keeps the same lines with timestamps in `<run dir>/<job>.log`); the argparse commands
(llm-scaling, llm-dashboard, llm-hf, llm-consolidate) call `setup_console_logging()`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pkgutil
import sys
from typing import TextIO

import tqdm

# Libraries that set their own loggers to INFO when imported ("GPU available: ...", "LOCAL_RANK: 0 -
# CUDA_VISIBLE_DEVICES", W&B's notes), which would otherwise fill the console and the run's log.
LIBRARIES = ("pytorch_lightning", "lightning_fabric", "lightning", "wandb")


class PlainFormatter(logging.Formatter):
    """`message` for information, `warning: message` and `error: message` above it, so a warning
    stands out in a plain log. `fmt` may add fields around the message (a timestamp in log files)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.levelno < logging.WARNING:
            return super().formatMessage(record)
        plain = record.message
        record.message = f"{record.levelname.lower()}: {plain}"
        try:
            return super().formatMessage(record)
        finally:
            record.message = plain


class _CurrentStreamHandler(logging.StreamHandler):
    """Writes to sys.<stream_name> as it is when a line comes (a redirect or pytest's capture
    made after logging was configured), above any tqdm bar on the terminal instead of through it."""

    stream_name = "stdout"

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return self.current()

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass  # the stream is looked up at each line

    def current(self) -> TextIO:
        return getattr(sys, self.stream_name)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.tqdm.write(self.format(record), file=self.current())
            self.flush()
        except Exception:
            self.handleError(record)


class StdoutHandler(_CurrentStreamHandler):
    stream_name = "stdout"


class StderrHandler(_CurrentStreamHandler):
    stream_name = "stderr"


class BelowWarning(logging.Filter):
    """Information only: warnings and errors go to their own handler (stderr)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class RunLogFile(logging.FileHandler):
    """The run's log file, created at its first line (with delay=True): a refused or dry run whose
    directory was removed leaves no file behind, and lines after the removal are dropped."""

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None and not os.path.isdir(os.path.dirname(self.baseFilename)):
            return
        super().emit(record)


def process_rank() -> int:
    """This process's global rank: Lightning's once it is imported, else the launcher's environment
    (torchrun's RANK, SLURM's SLURM_PROCID, LOCAL_RANK of the ranks llm-train spawns)."""
    lightning = sys.modules.get("lightning_utilities.core.rank_zero")
    rank = getattr(getattr(lightning, "rank_zero_only", None), "rank", None)
    if rank is not None:
        return int(rank)
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def speak_on_rank_zero() -> None:
    """Our loggers (`llm.*`) log information on rank zero only; every rank still reports warnings."""
    logging.getLogger("llm").setLevel(logging.INFO if process_rank() == 0 else logging.WARNING)


def keep_libraries_at_warning(packages: tuple[str, ...] = LIBRARIES) -> None:
    """Lightning sets its package logger to INFO when it is imported, after any level given here,
    so the level goes on its subpackages' loggers too (found without importing the package):
    every logger below them inherits WARNING."""
    for package in packages:
        logging.getLogger(package).setLevel(logging.WARNING)
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for module in pkgutil.iter_modules(spec.submodule_search_locations or []) if spec else ():
            logging.getLogger(f"{package}.{module.name}").setLevel(logging.WARNING)


def setup_console_logging() -> None:
    """Plain console logging for a command without Hydra: information on stdout, warnings and
    errors on stderr; rank zero only; libraries from WARNING up."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, _CurrentStreamHandler):
            root.removeHandler(handler)  # a second call in the same process replaces them
    info, problems = StdoutHandler(), StderrHandler()
    info.addFilter(BelowWarning())
    problems.setLevel(logging.WARNING)
    for handler in (info, problems):
        handler.setFormatter(PlainFormatter())
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    speak_on_rank_zero()
    keep_libraries_at_warning()
