"""The keys of `llm-data` (conf/curate.yaml and its groups), typed, and every check that can be
made before a document is read. Problems are collected and raised together as one ConfigError,
each naming the key, its value and the fix (the CLI exits with code 2)."""

from __future__ import annotations

import inspect
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from llm import fields
from llm.config import ConfigError
from llm.fields import at_least, unit_interval

FORMATS = ("text", "jsonl")
EXECUTORS = ("local", "slurm")
SPLITS = ("train", "val")
BUILTIN_TASKS = ("addition", "sorting", "copying", "counting")
COUNTS_FILE = "curation.json"


@dataclass
class LengthSettings:
    """Documents outside [min_chars, max_chars] characters are removed (after stripping whitespace)."""

    min_chars: int = at_least(0, 32)
    max_chars: Optional[int] = at_least(1, 1_000_000, null="for no upper limit")


@dataclass
class MinhashSettings:
    """datatrove's MinHash: documents are near duplicates when their word n-gram sets collide in
    one of `num_buckets` bands of `hashes_per_bucket` hashes (Jaccard ~0.8 and up)."""

    enabled: bool = True
    n_grams: int = at_least(1, 5, high=64)
    num_buckets: int = at_least(1, 14, high=1024)
    hashes_per_bucket: int = at_least(1, 8, high=1024)
    seed: int = 1


@dataclass
class DecontSettings:
    """N-gram decontamination against the evaluation sets the project ships."""

    enabled: bool = True
    n_grams: int = at_least(2, 13, high=64)
    # Also an item's prompt alone (a question leaked without its answer).
    prompts_alone: bool = True
    # The held-out prompts of these built-in tasks (llm.data.tasks): what llm-eval harness
    # builtin=[...] and trainer.downstream score, drawn as they draw them.
    builtin: list[str] = field(default_factory=lambda: list(BUILTIN_TASKS))
    builtin_knobs: dict[str, Any] = field(default_factory=dict)
    questions: int = at_least(1, 64, high=1_000_000)
    seed: int = 0
    val_fraction: float = unit_interval(0.1, low_open=True, high_open=True)
    # JSONL files with a "prompt" (and optionally "answer") per line: llm-eval's tasks_file,
    # llm-generate's prompts_file, the harness task files.
    files: list[str] = field(default_factory=list)


@dataclass
class QualitySettings:
    """Keyword arguments of datatrove's filters (null: the filter is off)."""

    name: str = "code"
    gopher_repetition: Optional[dict[str, Any]] = None
    gopher_quality: Optional[dict[str, Any]] = None
    c4: Optional[dict[str, Any]] = None
    # Keep a document's text as it was when C4's rules keep it (C4 removes and strips lines,
    # which would flatten code's indentation); the document-level rules still remove documents.
    c4_keep_text: bool = True


@dataclass
class SlurmSettings:
    partition: Optional[str] = None
    time: str = "04:00:00"
    cpus_per_task: int = at_least(1, 1, high=1024)
    mem_per_cpu_gb: float = at_least(0.1, 2.0, high=4096)
    qos: Optional[str] = None
    job_name: str = "llm-data"
    # more sbatch options: +executor.slurm.sbatch_args.account=myproj is sbatch's --account=myproj
    sbatch_args: dict[str, Any] = field(default_factory=dict)
    venv_path: Optional[str] = None  # a virtualenv activated in the job (default: none)


@dataclass
class ExecutorSettings:
    kind: str = "local"
    tasks: int = at_least(1, 1, high=100_000)    # shards of the reading and filtering stages
    workers: int = at_least(1, 1, high=1024)     # local: tasks run at once (processes)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


@dataclass
class CurateSettings:
    """The keys of conf/curate.yaml (besides the `data`, `logger` and `paths` groups)."""

    output_dir: str = "curated"
    # text: one UTF-8 file per kept document under <output_dir>/documents (llm-train data=text
    # reads them); jsonl: datatrove's JSONL shards (<output_dir>/documents/<rank>.jsonl.gz).
    format: str = "text"
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    max_documents: Optional[int] = at_least(1, None, null="for all of them")
    overwrite: bool = False
    datatrove_logs: bool = False  # local: datatrove's own log lines (every task's) on the console
    exact_dedup: bool = True
    length: LengthSettings = field(default_factory=LengthSettings)
    minhash: MinhashSettings = field(default_factory=MinhashSettings)
    decontamination: DecontSettings = field(default_factory=DecontSettings)
    quality: QualitySettings = field(default_factory=QualitySettings)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)


def typed(cfg: DictConfig) -> CurateSettings:
    """The schema's keys of `cfg` as a CurateSettings; ConfigError on unknown keys or wrong types."""
    names = [f for f in CurateSettings.__dataclass_fields__]
    try:  # resolved first: the values may interpolate keys outside these (${paths.root_dir})
        node = OmegaConf.create({n: OmegaConf.to_container(cfg[n], resolve=True, throw_on_missing=True)
                                 if OmegaConf.is_config(cfg[n]) else cfg[n] for n in names if n in cfg})
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CurateSettings), node))
    except MissingMandatoryValue as e:
        key = e.full_key or "config"
        raise ConfigError([f"{key}: required but not set (`???`); give it: {key}=..."]) from None
    except Exception as e:  # OmegaConf's errors: the key, and what went wrong
        key = getattr(e, "full_key", None) or "config"
        value = OmegaConf.select(cfg, key, default=None) if key != "config" else None
        first = str(e).splitlines()[0]
        hint = ""
        if "not in struct" in first or "Key '" in first:
            hint = "; see `llm-data --help` for the keys"
        raise ConfigError([f"{key}={value!r}: {first}{hint}"]) from None


def _choice(problems: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r}: not allowed; choose one of: {', '.join(allowed)}")


def filter_class(name: str) -> type:
    """The datatrove filter class behind a quality key."""
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    return {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
            "c4": C4QualityFilter}[name]


# Set by the pipeline itself, never by the config.
RESERVED = ("self", "exclusion_writer", "language")


def _check_filter_kwargs(problems: list[str], key: str, kwargs: Optional[dict[str, Any]]) -> None:
    if kwargs is None:
        return
    allowed = [p for p in inspect.signature(filter_class(key).__init__).parameters if p not in RESERVED]
    for name in kwargs:
        if name not in allowed:
            problems.append(f"quality.{key}.{name}: not a setting of datatrove's {filter_class(key).__name__}; "
                            f"allowed: {', '.join(allowed)} (or quality.{key}=null to turn it off)")


def check(s: CurateSettings) -> list[str]:
    """Every problem of the settings that needs no data."""
    problems: list[str] = []
    _choice(problems, "format", s.format, FORMATS)
    _choice(problems, "executor.kind", s.executor.kind, EXECUTORS)
    if s.executor.kind == "slurm" and shutil.which("sbatch") is None:
        problems.append("executor.kind='slurm': no `sbatch` on this machine; run llm-data where jobs are submitted "
                        "(a login node), or curate/executor=local")
    if not s.splits:
        problems.append("splits=[]: nothing to read; give splits=[train,val] or one of them")
    for split in s.splits:
        _choice(problems, "splits", split, SPLITS)
    problems += fields.problems(s)
    if s.length.max_chars is not None and s.length.max_chars < s.length.min_chars:
        problems.append(f"length.max_chars={s.length.max_chars}: below length.min_chars={s.length.min_chars}; "
                        "raise it or set length.max_chars=null")
    for key in ("gopher_repetition", "gopher_quality", "c4"):
        _check_filter_kwargs(problems, key, getattr(s.quality, key))
    d = s.decontamination
    for task in d.builtin:
        _choice(problems, "decontamination.builtin", task, BUILTIN_TASKS)
    for task in d.builtin_knobs:
        if task not in d.builtin:
            problems.append(f"decontamination.builtin_knobs.{task}: {task!r} is not in decontamination.builtin "
                            f"{list(d.builtin)}; add it there or drop the knobs")
    for number, path in enumerate(d.files):
        if not Path(path).expanduser().is_file():
            problems.append(f"decontamination.files[{number}]={path!r}: no such file; give JSONL files with a "
                            "\"prompt\" field per line")
    if d.enabled and not d.builtin and not d.files:
        problems.append("decontamination.enabled=true with no evaluation set: give decontamination.builtin=[...] "
                        "or decontamination.files=[...], or set decontamination.enabled=false")
    if not s.output_dir:
        problems.append("output_dir: empty; give a directory for the curated shards")
    return problems
