"""Where scaling data comes from: finished runs (run or sweep directories), CSV files, or W&B.

A *point* is one finished run: parameters N, tokens D, compute C and its final loss.
A *curve* is one run's validation loss against the FLOPs spent so far (for Approach 1).

Sources, as given to `load_runs` / `load_points`:
  runs/multirun/2024-..        a directory: every summary.json below it (any depth) is one run
  points.csv                   columns N, D, loss; optional C (else 6 N D), budget, run_id, N_non_embedding
  wandb:entity/project[/group] the runs of a W&B project (optionally one group), via wandb.Api()

Only runs with status "completed" are used; the others are counted in `RunSet.skipped`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llm.files import read_jsonl
from llm.run.layout import SUMMARY_FILE, RunDir

N_KINDS = ("total", "non_embedding")
LOSS_KEYS = ("val/loss", "best_val/loss")
CSV_REQUIRED = ("N", "D", "loss")


@dataclass(frozen=True)
class Point:
    N: float  # parameters (total or non-embedding, as chosen at load time)
    D: float  # tokens seen
    C: float  # training FLOPs
    loss: float
    run_id: str
    source: str
    budget: Optional[float] = None  # the FLOP budget the run was launched with, when known (IsoFLOP groups)


@dataclass(frozen=True)
class Curve:
    """One run's validation loss against training FLOPs, in training order."""

    run_id: str
    N: float
    flops_per_token: float
    C: np.ndarray
    loss: np.ndarray
    source: str

    @property
    def D(self) -> np.ndarray:
        return self.C / self.flops_per_token


@dataclass
class RunSet:
    points: list[Point] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # run (path or id) -> why it was not used


def load_points(sources: list[str], n_kind: str = "total", loss_key: str = "val/loss") -> list[Point]:
    """The final points of every usable run in `sources` (see the module docstring)."""
    return load_runs(sources, n_kind, loss_key).points


def load_curves(sources: list[str], n_kind: str = "total") -> list[Curve]:
    """Every completed run's val-loss-vs-FLOPs curve; CSV and W&B sources carry none."""
    return load_runs(sources, n_kind).curves


def load_runs(sources: list[str], n_kind: str = "total", loss_key: str = "val/loss") -> RunSet:
    """Points, curves and skipped runs of all sources together."""
    if n_kind not in N_KINDS:
        raise ValueError(f"n_kind={n_kind!r}: allowed {', '.join(N_KINDS)}")
    if loss_key not in LOSS_KEYS:
        raise ValueError(f"loss_key={loss_key!r}: allowed {', '.join(LOSS_KEYS)}")
    out = RunSet()
    for source in sources:
        if source.startswith("wandb:"):
            _add_wandb(out, source, n_kind, loss_key)
            continue
        path = Path(source)
        if path.is_dir():
            _add_directory(out, path, n_kind, loss_key)
        elif path.is_file() and path.suffix.lower() == ".csv":
            out.points.extend(read_csv(path, n_kind))
        elif path.exists():
            raise ValueError(f"{source}: not a run/sweep directory or a .csv file")
        else:
            raise FileNotFoundError(f"{source}: no such file or directory")
    return out


# ---------------------------------------------------------------- run directories

def _add_directory(out: RunSet, root: Path, n_kind: str, loss_key: str) -> None:
    files = sorted(root.rglob(SUMMARY_FILE))
    if not files:
        raise ValueError(f"{root}: no summary.json below this directory (is it a run or sweep directory?)")
    for file in files:
        try:
            summary = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            out.skipped[str(file.parent)] = f"unreadable summary.json ({e})"
            continue
        status = summary.get("status")
        if status != "completed":
            out.skipped[str(file.parent)] = f"status {status!r}"
            continue
        point = point_from_summary(summary, file.parent, n_kind, loss_key, source=str(root))
        if isinstance(point, str):
            out.skipped[str(file.parent)] = point
            continue
        out.points.append(point)
        curve = curve_from_run(file.parent, summary, n_kind, source=str(root))
        if curve is not None:
            out.curves.append(curve)


def _number(value: Any) -> Optional[float]:
    """A finite float, or None (missing values, NaN written as strings by the metrics logger)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def point_from_summary(summary: dict, run_dir: Optional[Path], n_kind: str, loss_key: str,
                       source: str) -> Point | str:
    """The run's point, or a string saying which key is missing. `run_dir` (None for W&B runs)
    names the run when summary.json has no run_id and may hold run.json."""
    n_key = "N" if n_kind == "total" else "N_non_embedding"
    values = {k: _number(summary.get(k)) for k in (n_key, "D", loss_key)}
    missing = [k for k, v in values.items() if v is None or (k != loss_key and v <= 0)]
    if missing:
        return f"summary.json lacks a usable {', '.join(missing)}"
    N, D, loss = values[n_key], values["D"], values[loss_key]
    C = _number(summary.get("C"))
    if C is None or C <= 0:
        fpt = _number(summary.get("flops_per_token"))
        C = D * fpt if fpt else 6.0 * N * D
    name = summary.get("run_id") or (run_dir.name if run_dir else "?")
    return Point(N=N, D=D, C=C, loss=loss, run_id=str(name),
                 source=source, budget=_launch_budget(summary, run_dir))


def _launch_budget(summary: dict, run_dir: Optional[Path]) -> Optional[float]:
    """The FLOP budget the run was started with: a numeric `budget` in summary.json, else
    `budget.flops` of the config in run.json. Runs of one IsoFLOP budget then group exactly,
    although their C differ by up to one optimizer step's worth of tokens."""
    budget = _number(summary.get("budget_flops", summary.get("budget")))
    if budget is not None:
        return budget
    run_file = RunDir(run_dir).run_file if run_dir else None
    if run_file and run_file.exists():
        try:
            config = json.loads(run_file.read_text()).get("config", {})
        except (OSError, json.JSONDecodeError):
            return None
        return _number((config.get("budget") or {}).get("flops"))
    return None


def curve_from_run(run_dir: Path, summary: dict, n_kind: str, source: str) -> Optional[Curve]:
    """Val loss against FLOPs = step x tokens_per_step x flops_per_token, from metrics.jsonl."""
    tokens_per_step = _number(summary.get("tokens_per_step"))
    fpt = _number(summary.get("flops_per_token"))
    N = _number(summary.get("N" if n_kind == "total" else "N_non_embedding"))
    metrics = RunDir(run_dir).metrics
    if not (tokens_per_step and fpt and N and metrics.exists()):
        return None
    steps, losses = [], []
    for record in read_jsonl(metrics):  # a torn last line of a killed run is skipped
        step, loss = _number(record.get("step")), _number(record.get("val/loss"))
        if step and step > 0 and loss is not None:
            steps.append(step)
            losses.append(loss)
    if not steps:
        return None
    order = np.argsort(steps, kind="stable")
    C = np.asarray(steps, dtype=np.float64)[order] * tokens_per_step * fpt
    return Curve(run_id=str(summary.get("run_id") or run_dir.name), N=N, flops_per_token=fpt, C=C,
                 loss=np.asarray(losses, dtype=np.float64)[order], source=source)


# ---------------------------------------------------------------- CSV

def read_csv(path: str | Path, n_kind: str = "total") -> list[Point]:
    """Points from a CSV with columns N, D, loss (optional C, budget, run_id, N_non_embedding).

    C defaults to 6 N D. With n_kind="non_embedding" the column N_non_embedding is used when
    present; otherwise N is taken as given."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        for name in CSV_REQUIRED:
            if name not in columns:
                raise ValueError(f"{path}: missing column {name!r} (have {columns}; needs {', '.join(CSV_REQUIRED)}; "
                                 "optional C, budget, run_id, N_non_embedding)")
        n_column = "N_non_embedding" if n_kind == "non_embedding" and "N_non_embedding" in columns else "N"
        points = []
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}

            def value(name: str, optional: bool = False) -> Optional[float]:
                text = row.get(name, "")
                if text == "" and optional:
                    return None
                try:
                    return float(text)
                except ValueError:
                    raise ValueError(f"{path}:{line}: column {name!r}: not a number: {text!r}") from None

            N, D, loss = value(n_column), value("D"), value("loss")
            C = value("C", optional=True)
            points.append(Point(N=N, D=D, C=C if C is not None else 6.0 * N * D, loss=loss,
                                run_id=row.get("run_id") or f"{path.name}:{line}", source=str(path),
                                budget=value("budget", optional=True)))
    if not points:
        raise ValueError(f"{path}: no rows")
    return points


# ---------------------------------------------------------------- W&B

def parse_wandb_spec(spec: str) -> tuple[str, str, Optional[str]]:
    """'wandb:entity/project[/group]' -> (entity, project, group or None)."""
    body = spec.removeprefix("wandb:")
    parts = body.split("/")
    if not spec.startswith("wandb:") or len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{spec!r}: expected wandb:<entity>/<project>[/<group>]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _add_wandb(out: RunSet, spec: str, n_kind: str, loss_key: str) -> None:
    """Finished runs of a W&B project. `llm-train` logs N, flops_per_token etc. under the
    config key `derived`, and trainer/tokens, trainer/flops and the losses as metrics."""
    entity, project, group = parse_wandb_spec(spec)
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(f"{spec}: reading W&B runs needs the wandb package ({e})") from e
    try:
        api = wandb.Api()
        runs = list(api.runs(f"{entity}/{project}", filters={"group": group} if group else None))
    except Exception as e:  # wandb raises its own errors for credentials and network: say what to do
        raise RuntimeError(f"{spec}: cannot read runs from W&B: {e} "
                           "(log in with `wandb login` or set WANDB_API_KEY; needs network access)") from e
    for run in runs:
        if run.state != "finished":
            out.skipped[f"wandb:{run.id}"] = f"state {run.state!r}"
            continue
        summary = dict(run.summary)
        derived = dict(run.config.get("derived") or {})
        budget = (run.config.get("budget") or {}).get("flops")
        merged = {**derived, **summary, "run_id": run.id, "status": "completed", "budget": budget}
        if _number(merged.get("D")) is None:
            merged["D"] = merged.get("trainer/tokens")
        if _number(merged.get("C")) is None:
            merged["C"] = merged.get("trainer/flops")
        point = point_from_summary(merged, None, n_kind, loss_key, source=spec)
        if isinstance(point, str):
            out.skipped[f"wandb:{run.id}"] = point
        else:
            out.points.append(point)
