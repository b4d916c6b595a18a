"""The local metrics file: every logged metric as one JSON line, written whatever the logger."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from llm.files import read_jsonl


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl."""
    return read_jsonl(path)


class JsonlLogger(Logger):
    """Appends `{"step": s, "metric": v, ...}` lines to metrics.jsonl.

    On resume from step k, records after k (written after the last checkpoint of the killed
    run) are dropped first, so the file shows one curve, as if the run had never stopped."""

    def __init__(self, path: str | Path, resume_step: Optional[int] = None):
        super().__init__()
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return self.path.parent.name

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing to write: the run's config is in config.yaml and run.json beside this file."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        # Lightning counts the step being logged from 0; record optimizer steps done instead,
        # which is also the global_step a checkpoint of this moment carries.
        record = {"step": None if step is None else step + 1}
        for key, value in metrics.items():
            if key == "epoch":  # the data stream is endless: epochs mean nothing here
                continue
            value = float(value)
            record[key] = value if math.isfinite(value) else str(value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def last_values(path: Path) -> dict[str, Any]:
    """The last logged value of every metric (post-training's rewards, KL, accuracies...)."""
    out: dict[str, Any] = {}
    for record in read_metrics(path):
        out.update({k: v for k, v in record.items() if k != "step"})
    return out
