"""Where scaling data comes from: finished runs (run or sweep directories), CSV files, or W&B.

A *point* is one finished run: parameters N, tokens D, compute C and its final loss.
A *curve* is one run's validation loss against the FLOPs spent so far (for Approach 1).

Sources, as given to `load_runs` / `load_points`:
  runs/multirun/2024-..        a directory: every summary.json below it (any depth) is one run
  points.csv                   columns N, D, loss; optional C (else 6 N D), budget, run_id, N_non_embedding
  wandb:entity/project[/group] the runs of a W&B project (optionally one group), via wandb.Api()

Only runs with status "completed" are used; the others (failed, diverged, running) are listed in
`RunSet.skipped` with their status, and so is a completed run that lacks one of the values (a run
trained without validation has no val/loss). A completed run or a CSV row whose N, D, C or loss is
present but not a positive finite number (NaN, inf, 0, negative, text) is an `InputError` naming the
file, the row and the key: a fit would otherwise be drawn through a corrupt value, or fail later
with a numpy warning that names nothing.

Every file is read through llm.files' checked path (`read_input_text`, `read_input_json`,
`read_records` here for JSON lines): missing, empty, not UTF-8, not JSON, a list where an object
belongs, a directory where a file belongs are `InputError`s too, which the CLIs turn into exit 2.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llm.files import InputError, checked_path, read_input_json, read_input_jsonl, read_input_text
from llm.run.layout import SUMMARY_FILE, RunDir

N_KINDS = ("total", "non_embedding", "active")
LOSS_KEYS = ("val/loss", "best_val/loss")
CSV_REQUIRED = ("N", "D", "loss")
CSV_OPTIONAL = ("C", "budget", "run_id", "N_non_embedding")
CSV_FIX = (f"give a UTF-8 CSV file with a header row naming the columns {', '.join(CSV_REQUIRED)} "
           f"(optional {', '.join(CSV_OPTIONAL)}) and one row per run")
RUN_FIX = ("rerun the run, or move its directory out of the sources (runs whose status is not completed "
           "are skipped)")
VALUE_FIX = "N, D, C, loss and budget must be positive finite numbers (leave C out for 6 N D)"


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
    """Points, curves and skipped runs of all sources together; InputError for a source that is
    missing or damaged, or a usable run or row with a bad value (see the module docstring)."""
    if n_kind not in N_KINDS:
        raise ValueError(f"n_kind={n_kind!r}: allowed {', '.join(N_KINDS)}")
    if loss_key not in LOSS_KEYS:
        raise ValueError(f"loss_key={loss_key!r}: allowed {', '.join(LOSS_KEYS)}")
    out = RunSet()
    for source in sources:
        if source.startswith("wandb:"):
            _add_wandb(out, source, n_kind, loss_key)
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            _add_directory(out, path, n_kind, loss_key)
        elif path.suffix.lower() == ".csv":
            out.points.extend(read_csv(path, n_kind))
        else:
            checked_path(path, "source", "file", "give a run or sweep directory, a .csv file, or wandb:ENTITY/PROJECT")
            raise InputError(f"source: {path} is neither a run/sweep directory nor a .csv file; give a directory "
                             "with summary.json files below it, a CSV file named *.csv, or wandb:ENTITY/PROJECT")
    return out


# ---------------------------------------------------------------- run directories

def _add_directory(out: RunSet, root: Path, n_kind: str, loss_key: str) -> None:
    files = sorted(root.rglob(SUMMARY_FILE))
    if not files:
        raise InputError(f"source: {root} has no {SUMMARY_FILE} below it; give a run or sweep directory "
                         "(llm-train writes summary.json into every run directory), or a .csv file")
    for file in files:
        summary = read_input_json(file, "run", RUN_FIX)
        status = summary.get("status")
        if status != "completed":
            out.skipped[str(file.parent)] = f"status {status!r}"
            continue
        point = point_from_summary(summary, file.parent, n_kind, loss_key, source=str(root), where=str(file))
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


def bad_number(value: Any) -> Optional[str]:
    """Why `value` is not a positive finite number (text for a message), or None when it is one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"is {value!r} ({type(value).__name__}), not a number"
    if not math.isfinite(value):
        return f"is {value}, not a finite number"
    if value <= 0:
        return f"is {value:g}, not > 0"
    return None


def _summary_value(summary: dict, key: str, where: str) -> Optional[float]:
    """summary[key] as a positive finite float; None when the key is absent or null; InputError
    naming the file and key when it holds anything else."""
    value = summary.get(key)
    if value is None:
        return None
    why = bad_number(value)
    if why:
        raise InputError(f"run: {where}: {key!r} {why}, although the run completed; {RUN_FIX}")
    return float(value)


def _positive_product(C: float, formula: str, where: str) -> float:
    """A C computed from other values: 6 N D of huge N and D can still overflow."""
    if not (math.isfinite(C) and C > 0):
        raise InputError(f"{where}: C = {formula} is {C:g}, not a positive finite number; {VALUE_FIX}")
    return C


# --n-kind -> the summary.json key of N. `active` (parameters a token passes through: an MoE
# model's top-k experts) falls back to N for runs that recorded none (dense: all are active).
N_KEYS = {"total": "N", "non_embedding": "N_non_embedding", "active": "params_active"}


def _n_key(summary: dict, n_kind: str) -> str:
    key = N_KEYS[n_kind]
    return "N" if key == "params_active" and summary.get(key) is None else key


def point_from_summary(summary: dict, run_dir: Optional[Path], n_kind: str, loss_key: str,
                       source: str, where: Optional[str] = None) -> Point | str:
    """The run's point, or a string saying which key is missing. `run_dir` (None for W&B runs)
    names the run when summary.json has no run_id and may hold run.json; `where` names it in
    errors. A value that is present but not a positive finite number is an InputError."""
    where = where or (str(run_dir / SUMMARY_FILE) if run_dir else source)
    n_key = _n_key(summary, n_kind)
    values = {k: _summary_value(summary, k, where) for k in (n_key, "D", loss_key)}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        return f"summary.json lacks {', '.join(missing)}"
    N, D, loss = values[n_key], values["D"], values[loss_key]
    C = _summary_value(summary, "C", where)
    fpt = _summary_value(summary, "flops_per_token", where)
    if C is None:
        C = _positive_product(D * fpt, f"D x flops_per_token = {D:g} x {fpt:g}", f"run: {where}") if fpt \
            else _positive_product(6.0 * N * D, f"6 N D = 6 x {N:g} x {D:g}", f"run: {where}")
    name = summary.get("run_id") or (run_dir.name if run_dir else "?")
    return Point(N=N, D=D, C=C, loss=loss, run_id=str(name),
                 source=source, budget=_launch_budget(summary, run_dir, where))


def _launch_budget(summary: dict, run_dir: Optional[Path], where: str) -> Optional[float]:
    """The FLOP budget the run was started with: a numeric `budget` in summary.json, else
    `budget.flops` of the config in run.json. Runs of one IsoFLOP budget then group exactly,
    although their C differ by up to one optimizer step's worth of tokens."""
    key = "budget_flops" if "budget_flops" in summary else "budget"
    if isinstance(summary.get(key), (int, float)):  # other budgets (a dict, a kind's name) say nothing
        return _summary_value(summary, key, where)
    run_file = RunDir(run_dir).run_file if run_dir else None
    if run_file is None or not (run_file.exists() or run_file.is_symlink()):
        return None
    config = read_input_json(run_file, "run", RUN_FIX).get("config")
    budget = config.get("budget") if isinstance(config, dict) else None
    flops = budget.get("flops") if isinstance(budget, dict) else None
    return _summary_value({"budget.flops": flops}, "budget.flops", str(run_file)) if isinstance(flops, (int, float)) \
        else None


def read_records(path: str | Path, key: str, fix: str) -> list[dict]:
    """The records of a JSON-lines file the framework appends to (metrics.jsonl): none when there is
    no file, and a torn last line (a killed writer's) skipped. Anything else that is not one JSON
    object per line (a directory, not UTF-8, a bad line before the last) is an InputError naming
    the file and line. (llm.files.read_jsonl skips every bad line; a reader of user-given runs
    must refuse the ones a crash cannot explain.)"""
    path = Path(path).expanduser()
    if not (path.exists() or path.is_symlink()):
        return []
    lines = read_input_jsonl(path, key, fix, allow_empty=True)
    records = []
    for i, line in enumerate(lines):
        if line.error is not None:
            if i == len(lines) - 1:
                continue  # the torn last line of a killed run
            raise InputError(f"{key}: {path} line {line.number} is not JSON ({line.error}); {fix}")
        if not isinstance(line.value, dict):
            raise InputError(f"{key}: {path} line {line.number} holds {type(line.value).__name__}, "
                             f"not a JSON object; {fix}")
        records.append(line.value)
    return records


def curve_from_run(run_dir: Path, summary: dict, n_kind: str, source: str) -> Optional[Curve]:
    """Val loss against FLOPs = step x tokens_per_step x flops_per_token, from metrics.jsonl."""
    where = str(run_dir / SUMMARY_FILE)
    tokens_per_step = _summary_value(summary, "tokens_per_step", where)
    fpt = _summary_value(summary, "flops_per_token", where)
    N = _summary_value(summary, _n_key(summary, n_kind), where)
    metrics = RunDir(run_dir).metrics
    if not (tokens_per_step and fpt and N):
        return None
    steps, losses = [], []
    for record in read_records(metrics, "run", RUN_FIX):
        step, loss = _number(record.get("step")), _number(record.get("val/loss"))
        if step and step > 0 and loss is not None:  # NaN losses are logged as text; the guard stopped those
            if loss <= 0:
                raise InputError(f"run: {metrics} has val/loss {loss:g} at step {step:g}, not > 0; {RUN_FIX}")
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
    present; otherwise N is taken as given. Anything wrong (the file, a column, a value that is
    not a positive finite number) is an InputError naming the file, line and column."""
    path = Path(path).expanduser()
    text = read_input_text(path, "source", CSV_FIX).removeprefix("\ufeff")  # a spreadsheet's byte-order mark
    reader = csv.DictReader(io.StringIO(text, newline=""))
    points = []
    try:
        columns = [c.strip() for c in reader.fieldnames or []]
        for name in CSV_REQUIRED:
            if name not in columns:
                raise InputError(f"source: {path}: missing column {name!r} (its header row has {columns}); {CSV_FIX}")
        n_column = N_KEYS[n_kind] if N_KEYS[n_kind] in columns else "N"
        for row in reader:
            points.append(_csv_point(row, path, reader.line_num, n_column))
    except csv.Error as e:
        raise InputError(f"source: {path}:{reader.line_num}: not CSV ({e}); {CSV_FIX}") from e
    if not points:
        raise InputError(f"source: {path} has a header but no rows; {CSV_FIX}")
    return points


def _csv_point(row: dict, path: Path, line: int, n_column: str) -> Point:
    where = f"source: {path}:{line}"
    row = {k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}

    def value(name: str, optional: bool = False) -> Optional[float]:
        text = row.get(name, "")
        if text == "" and optional:
            return None
        try:
            number = float(text)
        except ValueError:
            raise InputError(f"{where}: column {name!r}: not a number: {text!r}; {VALUE_FIX}, or delete the row") from None
        why = bad_number(number)
        if why:
            raise InputError(f"{where}: column {name!r} {why} (written {text!r}); {VALUE_FIX}, or delete the row")
        return number

    N, D, loss = value(n_column), value("D"), value("loss")
    C = value("C", optional=True)
    if C is None:
        C = _positive_product(6.0 * N * D, f"6 N D = 6 x {N:g} x {D:g}", where)
    return Point(N=N, D=D, C=C, loss=loss, run_id=row.get("run_id") or f"{path.name}:{line}",
                 source=str(path), budget=value("budget", optional=True))


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
        point = point_from_summary(merged, None, n_kind, loss_key, source=spec, where=f"{spec} run {run.id}")
        if isinstance(point, str):
            out.skipped[f"wandb:{run.id}"] = point
        else:
            out.points.append(point)
