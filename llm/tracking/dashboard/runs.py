"""Which runs a dashboard shows: found in run/sweep directories (every summary.json below them) or
listed from a W&B project, then filtered by group, job type, tags and config values, and grouped
by the config groups whose choice differs between them.

A run's files are read through llm.files' checked path: a damaged summary.json, run.json,
config.yaml or metrics.jsonl (not JSON, empty, not UTF-8, a directory, a list where an object
belongs) is an InputError naming the file, which the CLI turns into exit 2. A run the dashboard
shows must be the run on disk, not a silent gap in the table. A torn last line of metrics.jsonl
(a killed or still running writer) is not damage and is skipped."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llm.files import InputError, checked_path, read_input_json, read_input_text
from llm.run.layout import SUMMARY_FILE, RunDir
from llm.scaling.points import read_records
from llm.tracking.run import run_id
from llm.tracking.wandb import run_name

log = logging.getLogger(__name__)


class SelectionError(ValueError):
    """No runs, or a filter or grouping key that cannot apply: the CLI exits with code 2."""


@dataclass
class Run:
    """One run as a dashboard sees it."""

    run_id: str
    name: str
    status: str
    group: Optional[str]  # the experiment or sweep (W&B group)
    job_type: str  # the stage (W&B job_type)
    choices: dict[str, str]  # config group -> chosen option
    config: dict[str, Any]  # flat, dotted keys of the resolved config
    summary: dict[str, Any]  # summary.json (or the W&B summary)
    tags: list[str] = field(default_factory=list)
    run_dir: Optional[Path] = None
    history: list[dict] = field(default_factory=list)  # metrics.jsonl records (local runs only)
    overrides: list[str] = field(default_factory=list)  # the command line's overrides (a sweep job's own values)
    swept: list[str] = field(default_factory=list)  # the keys its sweep swept (hydra.sweeper.params, `k=a,b`)

    def value(self, key: str) -> Any:
        """A choice (`attention` or `choice/attention`), a config key (`model.d_model`), or a summary key."""
        key = key.removeprefix("choice/")
        if key in self.choices:
            return self.choices[key]
        if key in self.config:
            return self.config[key]
        if key in self.summary:
            return self.summary[key]
        return override_values(self.overrides).get(key)  # e.g. experiment=..., which no config key keeps


@dataclass
class Filters:
    """What a selection keeps: all given conditions must hold."""

    group: Optional[str] = None
    job_type: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    where: dict[str, str] = field(default_factory=dict)  # key -> value, compared as text

    @classmethod
    def parse_where(cls, items: list[str]) -> dict[str, str]:
        where = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise SelectionError(f"--where {item!r}: expected KEY=VALUE, e.g. attention=gqa or model.d_model=128")
            where[key.strip()] = value.strip()
        return where

    def keeps(self, run: Run) -> bool:
        return ((self.group is None or run.group == self.group)
                and (self.job_type is None or run.job_type == self.job_type)
                and all(t in run.tags for t in self.tags)
                and all(_text(run.value(k)) == v for k, v in self.where.items()))

    def describe(self) -> str:
        parts = [f"group={self.group}"] if self.group else []
        parts += [f"job_type={self.job_type}"] if self.job_type else []
        parts += [f"tag={t}" for t in self.tags] + [f"{k}={v}" for k, v in self.where.items()]
        return ", ".join(parts) or "none"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'model': {'d_model': 128}} -> {'model.d_model': 128}; lists stay values."""
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------- local run directories

HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
RUN_FIX = "rerun the run, or move its directory out of the directories given"
SOURCE_FIX = "give run or sweep directories (llm-train writes summary.json into every run directory)"


def load_local_run(run_dir: Path) -> Run:
    """A run from its directory: summary.json, run.json (config, choices), metrics.jsonl."""
    files = RunDir(run_dir)
    summary = read_input_json(files.summary, "run", RUN_FIX)
    saved = read_input_json(files.run_file, "run", RUN_FIX) if _present(files.run_file) else {}
    config = _resolved_config(run_dir) or saved.get("config") or {}
    if not isinstance(config, dict):
        raise InputError(f"run: {files.run_file} has a 'config' that is {type(config).__name__}, not an object; {RUN_FIX}")
    flat = flatten(config)
    choices = summary.get("choices") or saved.get("choices") or {}
    if not isinstance(choices, dict):
        where = files.summary if summary.get("choices") else files.run_file
        raise InputError(f"run: {where} has 'choices' that are {type(choices).__name__}, not an object of "
                         f"group: option; {RUN_FIX}")
    choices = {str(g): str(c) for g, c in choices.items()}
    rid = str(summary.get("run_id") or saved.get("run_id") or run_dir.name)
    group = flat.get("logger.group") or flat.get("experiment_name") or _sweep_of(run_dir, flat.get("paths.runs_dir"))
    configured_tags = flat.get("logger.tags") or []
    tags = [f"{g}:{c}" for g, c in choices.items()] + [str(t) for t in
                                                        (configured_tags if isinstance(configured_tags, list) else [])]
    return Run(run_id=rid, name=run_name(rid, choices),
               status=str(summary.get("status", "unknown")), group=None if group is None else str(group),
               job_type=str(summary.get("stage", "pretrain")), choices=choices, config=flat, summary=summary,
               tags=tags, run_dir=run_dir, history=read_records(files.metrics, "run", RUN_FIX),
               overrides=_overrides(run_dir, saved), swept=swept_keys(run_dir.parent))


def _present(path: Path) -> bool:
    """An optional file is there (a dangling link counts: reading it says what is wrong)."""
    return path.exists() or path.is_symlink()


def _resolved_config(run_dir: Path) -> Optional[dict]:
    """config.yaml: the resolved (and redacted) config llm-train writes beside run.json."""
    path = RunDir(run_dir).config_file
    if not _present(path):
        return None
    from omegaconf import DictConfig, OmegaConf

    text = read_input_text(path, "run", RUN_FIX)
    try:
        config = OmegaConf.create(text)
    except Exception as e:  # yaml's ScannerError, ParserError, ... : the file is not YAML
        raise InputError(f"run: {path} is not YAML ({type(e).__name__}: {str(e).splitlines()[0]}); {RUN_FIX}") from e
    if not isinstance(config, DictConfig):
        raise InputError(f"run: {path} holds a {type(config).__name__}, not a mapping of config keys; {RUN_FIX}")
    return OmegaConf.to_container(config, resolve=False)


def _overrides(run_dir: Path, saved: dict) -> list[str]:
    """The run's command-line overrides: run.json keeps them; Hydra's .hydra/overrides.yaml too."""
    overrides = saved.get("overrides")
    if overrides is None and (run_dir / HYDRA_OVERRIDES).is_file():
        import yaml

        try:
            overrides = yaml.safe_load((run_dir / HYDRA_OVERRIDES).read_text())
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:  # optional: grouping falls back to the choices
            log.warning(f"{run_dir / HYDRA_OVERRIDES}: not read ({type(e).__name__}); its overrides are not compared")
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def swept_keys(sweep_dir: Path) -> list[str]:
    """The keys a Hydra multirun swept: hydra.sweeper.params (sweep=/experiment= files) and the
    command line's `key=a,b` / range / choice overrides, from the multirun.yaml Hydra writes."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return []
    cached = _SWEPT.get(path)
    if cached is None:
        cached = _read_swept(path)
        _SWEPT[path] = cached
    return list(cached)


_SWEPT: dict[Path, list[str]] = {}
SWEEP_VALUE = re.compile(r"^(range|choice|interval|glob)\(|^[^\[{].*,")  # a list or dict value is not a sweep


def _read_swept(path: Path) -> list[str]:
    import yaml

    try:
        hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError, AttributeError) as e:
        log.warning(f"{path}: not read ({type(e).__name__}); the sweep's keys come from the runs' overrides")
        return []
    params = (hydra.get("sweeper") or {}).get("params") or {}
    task = (hydra.get("overrides") or {}).get("task") or []
    keys = [str(k) for k in params] if isinstance(params, dict) else []
    for key, value in override_values([str(o) for o in task] if isinstance(task, list) else []).items():
        if SWEEP_VALUE.search(value):
            keys.append(key)
    return list(dict.fromkeys(keys))


def override_values(overrides: list[str]) -> dict[str, str]:
    """['+a.b=1', 'attention=gqa', '~x'] -> {'a.b': '1', 'attention': 'gqa'} (deletions have no value)."""
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("+")
        if sep and key and not key.startswith("~"):
            out[key.removeprefix("hydra/").strip()] = value.strip()
    return out


def _sweep_of(run_dir: Path, runs_dir: Any) -> Optional[str]:
    """A multirun job's sweep (Hydra writes multirun.yaml there), named as its W&B group is."""
    if not (run_dir.parent / "multirun.yaml").is_file():
        return None
    return run_id(run_dir.parent, Path(str(runs_dir))) if runs_dir else run_dir.parent.name


def find_local_runs(paths: list[str | Path]) -> list[Run]:
    """Every run below the given run/sweep directories (any depth), in path order; InputError for a
    source that is not a directory or a run whose files are damaged."""
    runs, seen = [], set()
    for path in map(Path, paths):
        checked_path(path, "source", "dir", SOURCE_FIX)
        for summary in sorted(path.rglob(SUMMARY_FILE)):
            run_dir = summary.parent.resolve()
            if run_dir in seen:
                continue
            seen.add(run_dir)
            runs.append(load_local_run(run_dir))
    return runs


def find_fits(paths: list[str | Path]) -> list[Path]:
    """The fit.json files that `llm-scaling fit` wrote below the given directories, newest first."""
    fits = {f.resolve() for p in map(Path, paths) if p.is_dir() for f in p.rglob("fit.json") if f.is_file()}
    return sorted(fits, key=lambda f: f.stat().st_mtime, reverse=True)


def find_fit(paths: list[str | Path]) -> Optional[Path]:
    """The newest fit.json that `llm-scaling fit` wrote below the given directories."""
    fits = find_fits(paths)
    return fits[0] if fits else None


# ---------------------------------------------------------------- W&B projects

def parse_wandb_source(source: str) -> tuple[Optional[str], str]:
    """'wandb:ENTITY/PROJECT' or 'wandb:PROJECT' -> (entity or None, project)."""
    parts = source.removeprefix("wandb:").split("/")
    if not source.startswith("wandb:") or len(parts) not in (1, 2) or not all(parts):
        raise SelectionError(f"{source!r}: expected wandb:ENTITY/PROJECT or wandb:PROJECT")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def api_filters(filters: Filters) -> dict[str, Any]:
    """The W&B public API's MongoDB-style query for these filters."""
    conditions: list[dict[str, Any]] = []
    if filters.group is not None:
        conditions.append({"group": filters.group})
    if filters.job_type is not None:
        conditions.append({"jobType": filters.job_type})
    conditions += [{"tags": {"$in": [t]}} for t in filters.tags]
    conditions += [{f"config.{config_key(k)}": typed_value(v)} for k, v in filters.where.items()]
    return {"$and": conditions} if conditions else {}


def config_key(key: str) -> str:
    """A choice is a flat config key (`choice/attention`); anything else is a config path."""
    return key if "." in key or key.startswith("choice/") else f"choice/{key}"


def typed_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return {"true": True, "false": False, "null": None}.get(text, text)


def find_wandb_runs(source: str, filters: Filters) -> list[Run]:
    """The runs of a W&B project that match the filters (needs credentials and network)."""
    entity, project = parse_wandb_source(source)
    import wandb

    api = wandb.Api()
    path = f"{entity or api.default_entity}/{project}"
    try:
        listed = list(api.runs(path, filters=api_filters(filters)))
    except Exception as e:  # wandb raises its own errors for credentials and network: say what to do
        raise SelectionError(f"{source}: cannot list runs ({type(e).__name__}: {e}); log in with `wandb login` "
                             "or set WANDB_API_KEY, and check the project name") from e
    runs = []
    for r in listed:
        config = flatten({k: v for k, v in r.config.items() if not k.startswith("_")})
        choices = {k.removeprefix("choice/"): str(v) for k, v in config.items() if k.startswith("choice/")}
        overrides = r.config.get("overrides")
        runs.append(Run(run_id=r.id, name=r.name, status=r.state, group=r.group, job_type=r.job_type or "",
                        choices=choices, config={k: v for k, v in config.items() if k != "overrides"},
                        summary=dict(r.summary._json_dict), tags=list(r.tags),
                        overrides=[str(o) for o in overrides] if isinstance(overrides, list) else []))
    return runs


# ---------------------------------------------------------------- mixture-of-experts metrics

# What MoE training logs every log_every steps (llm.stages.pretrain.PretrainModule.log_moe).
MOE_METRICS = ("train/moe/aux_loss", "train/moe/z_loss", "train/moe/load_cv", "train/moe/dropped_frac")
EXPERT_LOAD = re.compile(r"^train/moe/load/layer(\d+)/expert(\d+)$")  # small models' per-expert loads


def logged_names(runs: list[Run]) -> list[str]:
    """Every metric name the runs logged (local history) or hold in their summary (W&B), first seen first."""
    names = (k for r in runs for source in (*r.history, r.summary) for k in source)
    return list(dict.fromkeys(names))


def moe_metrics(runs: list[Run]) -> list[str]:
    """The MoE summary metrics (MOE_METRICS) that any of the runs logged, in that order."""
    logged = set(logged_names(runs))
    return [m for m in MOE_METRICS if m in logged]


def expert_load_metrics(runs: list[Run]) -> dict[int, list[str]]:
    """The per-expert load metrics the runs logged: {layer: names by expert}, layers in order."""
    found: dict[int, dict[int, str]] = {}
    for name in logged_names(runs):
        match = EXPERT_LOAD.match(name)
        if match:
            found.setdefault(int(match[1]), {})[int(match[2])] = name
    return {layer: [experts[j] for j in sorted(experts)] for layer, experts in sorted(found.items())}


# ---------------------------------------------------------------- grouping

# What says how a run was set up or launched, not what it tested: never a grouping key. (A sweep
# file's jobs carry the values it swept as their own overrides; its name adds nothing.)
NOT_VARIABLES = ("logger", "paths", "hydra", "resume", "trainer.progress_bar", "dry_run", "sweep")


def _is_variable(key: str) -> bool:
    return not any(key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in NOT_VARIABLES)


def varying_keys(runs: list[Run]) -> list[str]:
    """What really varied between the runs (the default grouping): the keys their sweeps swept and
    their overrides set (config keys such as model.size, or group choices such as attention), then
    the config groups whose option differs; each only if its value differs between these runs.
    Never the logger, paths or Hydra's own settings."""
    candidates = [*(k for r in runs for k in r.swept), *(k for r in runs for k in override_values(r.overrides)),
                  *(g for r in runs for g in r.choices)]
    keys = []
    for key in dict.fromkeys(candidates):
        if _is_variable(key) and len({_text(r.value(key)) for r in runs}) > 1:
            keys.append(key)
    return keys


varying_groups = varying_keys  # the name the W&B report builder and older callers use


def check_group_by(runs: list[Run], keys: list[str]) -> None:
    unknown = [k for k in keys if k != "run" and all(r.value(k) is None for r in runs)]
    if unknown:
        known = sorted({*(g for r in runs for g in r.choices), "run"})
        raise SelectionError(f"--group-by {','.join(unknown)}: not a choice or config key of the selected runs; "
                             f"choices: {', '.join(known)} (or any config key, e.g. model.d_model)")


def group_label(run: Run, keys: list[str]) -> str:
    """'attention=gqa' (or 'model.size=2.5e4, budget.flops=5e12'); the run's name when grouping by run."""
    if not keys or keys == ["run"]:
        return run.name
    return ", ".join(f"{k.removeprefix('choice/')}={format_value(run.value(k))}" for k in keys)


def format_value(value: Any) -> str:
    """A value as a label shows it: numbers compactly (25000 -> 2.5e4, 0.0003 -> 3e-4, 128 -> 128)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _text(value)
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e4 or magnitude < 1e-2:
        mantissa, exponent = f"{value:.3e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"
