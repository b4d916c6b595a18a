"""Where eval results go: a printed table, `eval.json` (atomic), `eval/*` lines in the run's
metrics.jsonl at the checkpoint's step, and optionally a W&B run."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

from llm.files import write_json

log = logging.getLogger(__name__)

METRIC_KEYS = ("loss", "ppl", "bits_per_byte", "accuracy")  # logged as eval/<key>; a quantised copy as eval/int8/<key>, eval/int4/<key>


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{'fp32': {...}, 'int8': {...}} -> {'eval/loss': ..., 'eval/int8/loss': ...}. Tokens/s are not
    among them: they measure the machine as much as the model (eval.json has them)."""
    out = {}
    for variant, values in results.items():
        prefix = "eval/" if variant == "fp32" else f"eval/{variant}/"
        out.update({prefix + k: float(values[k]) for k in METRIC_KEYS if values.get(k) is not None})
    return out


def append_metrics(path: Path, step: int, metrics: dict[str, float]) -> None:
    """One `{"step": ..., "eval/loss": ...}` line, as JsonlLogger writes them. A single short
    append, so a reader of the file (read_metrics) sees the whole line or none of it."""
    record = {"step": step, **{k: v if math.isfinite(v) else str(v) for k, v in metrics.items()}}
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_eval_json(out_dir: Path, report: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval.json"
    write_json(path, report)
    return path


def _cell(values: dict[str, float], key: str) -> str:
    v = values.get(key)
    if v is None:
        return "-"
    if key == "accuracy":
        return f"{v:.3f} ({int(values['correct'])}/{int(values['count'])})"
    if key == "model_bytes":
        return f"{v / 2**20:.3f}"
    if key.endswith("_per_s"):
        return f"{v:,.0f}"
    return f"{v:,.1f}" if key == "ppl" else f"{v:.4f}"


def table(results: dict[str, dict[str, float]]) -> str:
    """One column per model variant, one row per measurement."""
    rows = [("loss (nats/token)", "loss"), ("perplexity", "ppl"), ("bits per byte", "bits_per_byte"),
            ("task accuracy", "accuracy"), ("weights (MiB)", "model_bytes"),
            ("decode tokens/s", "decode_tokens_per_s"), ("forward tokens/s", "forward_tokens_per_s")]
    rows = [(label, key) for label, key in rows if any(key in v for v in results.values())]
    width = max(18, *(len(_cell(v, "accuracy")) + 2 for v in results.values()))
    lines = [f"{'':20}" + "".join(f"{name:>{width}}" for name in results)]
    for label, key in rows:
        lines.append(f"{label:20}" + "".join(f"{_cell(v, key):>{width}}" for v in results.values()))
    return "\n".join(lines)


def log_wandb(logger: Any, mode: str, run_id: Optional[str], out_dir: Path, step: int,
              metrics: dict[str, float], config: dict[str, Any], while_open: Optional[Callable[[], Any]] = None) -> None:
    """A W&B run of job type `eval`, grouped with the run it measures (offline without credentials).
    `while_open` runs while the W&B run is active (it logs the sample table)."""
    import wandb

    from llm.tracking.run import redact_secrets, redacted_argv

    os.environ.setdefault("WANDB_SILENT", "true")
    with redacted_argv():  # W&B records the command line as the run's `args`: redacted as in llm-train
        run = wandb.init(project=logger.project, entity=logger.entity, mode=mode, dir=str(out_dir), job_type="eval",
                         group=redact_secrets(logger.group or run_id),
                         name=redact_secrets(f"eval {run_id or out_dir.name}"),
                         tags=redact_secrets(["eval", *logger.tags]), notes=redact_secrets(logger.notes),
                         config=redact_secrets(config))
    run.log({**metrics, "trainer/global_step": step})
    run.summary.update({**metrics, "step": step})
    if while_open is not None:
        while_open()
    run.finish()
    if mode == "offline":
        log.info(f"W&B is offline; to upload: wandb sync {Path(run.dir).parent}")
