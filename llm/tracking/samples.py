"""Sample completions of a generating stage (evaluation, PPO, GRPO): a W&B Table every N steps, and
always the same rows in `<run_dir>/samples.jsonl`, so they can be read without a W&B account.

    samples = SampleLog(run_dir, every_n_steps=50)
    if samples.due(step):
        samples.log(step, [{"prompt": p, "completion": c, "reward": r} for p, c, r in batch])

A row is a flat dict of strings and numbers; each JSONL line is `{"step": ..., "key": ..., **row}`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from llm.files import read_jsonl
from llm.run.layout import SAMPLES_FILE


def read_samples(path: str | Path) -> list[dict]:
    """The rows of a samples.jsonl; a torn last line (a killed run) is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / SAMPLES_FILE
    return read_jsonl(path)


def _cell(value: Any) -> Any:
    """A value a W&B Table and JSON both hold: numbers and strings as they are, the rest as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        return _cell(value.item())
    return json.dumps(value, default=str)


class SampleLog:
    """Logs rows of samples every `every_n_steps` steps, under the W&B key `key`.

    Only global rank 0 writes (other ranks' calls do nothing), so a distributed stage can call it
    on every rank."""

    def __init__(self, run_dir: str | Path, every_n_steps: int = 1, key: str = "samples", max_rows: Optional[int] = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: must be >= 1")
        self.path = Path(run_dir) / SAMPLES_FILE
        self.every_n_steps = every_n_steps
        self.key = key
        self.max_rows = max_rows  # per call: a PPO batch may hold hundreds of completions

    def due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def log(self, step: int, rows: Iterable[dict[str, Any]], force: bool = False) -> bool:
        """Write the rows (when `step` is due, or `force`); returns whether they were written."""
        from llm.parallel.launch import is_rank_zero

        if not (force or self.due(step)) or not is_rank_zero():
            return False
        rows = [{k: _cell(v) for k, v in row.items()} for row in rows][: self.max_rows]
        if not rows:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:  # one write: a reader sees whole lines
            f.write("".join(json.dumps({"step": step, "key": self.key, **row}) + "\n" for row in rows))
        self._log_table(step, rows)
        return True

    def _log_table(self, step: int, rows: list[dict[str, Any]]) -> None:
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None:
            return
        columns = list(dict.fromkeys(k for row in rows for k in row))  # first-seen order
        table = wandb.Table(columns=["step", *columns], data=[[step, *(row.get(c) for c in columns)] for row in rows],
                            allow_mixed_types=True)
        wandb.run.log({self.key: table, "trainer/global_step": step})
