"""The keys of `llm-generate` and `llm-eval`, typed, and every check that can be made before a
model or tokenizer is loaded. Problems are collected and raised together as one ConfigError, each
naming the key, its value and what is allowed (the CLIs exit with code 2)."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llm import fields
from llm.config import ConfigError
from llm.fields import at_least, bounded
from llm.files import InputError, checked_path
from llm.model.config import MAX_SEQ_LEN

log = logging.getLogger(__name__)
T = TypeVar("T")
STRATEGIES = ("greedy", "sample", "beam", "speculative")
QUANTIZE = ("none", "int8", "int4")  # weight-only (llm.generate.quantize)
STREAMING_STRATEGIES = ("greedy", "sample")  # the ones whose decoder hands out tokens one by one
EVAL_LOGGERS = ("none", "wandb")  # eval.json and metrics.jsonl are always written
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
# The decoding keys each strategy reads; set away from its default for a strategy that does not
# read it, a key would be silently ignored, so it is refused (check_generate).
READ_BY = {
    "temperature": ("sample", "speculative"),
    "top_k": ("sample", "speculative"),
    "top_p": ("sample", "speculative"),
    "beam_width": ("beam",),
    "draft_checkpoint": ("speculative",),
    "speculative_k": ("speculative",),
    "compile": ("greedy", "sample"),  # the batched decoder's step (beam and speculative run their own loops)
}


def unescape(text: str) -> str:
    """\\n, \\t and \\\\ as newline, tab and backslash (in `prompt` and stop strings): Hydra's override
    grammar passes them through literally, and a shell argument is an awkward place for a newline."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


@dataclass
class TokenizerKey:
    """`tokenizer.path=...`: a dotted key, as `tokenizer` alone would select an option of llm-train's
    tokenizer group (the apps share its config directory), and as llm-train's pretrained option spells it."""

    path: Optional[str] = None


@dataclass
class GenerateSettings:
    """The keys of conf/generate.yaml (see there for what each does)."""

    checkpoint: Optional[str] = None
    tokenizer: TokenizerKey = field(default_factory=TokenizerKey)
    prompt: Optional[str] = None
    prompts_file: Optional[str] = None
    output_file: Optional[str] = None
    add_bos: bool = False
    max_new_tokens: int = at_least(1, 64)  # and <= MAX_SEQ_LEN (check_generate)
    strategy: str = "greedy"
    temperature: float = at_least(0, 1.0)  # 0: greedy
    top_k: Optional[int] = at_least(1, None, null="for no top-k filter")
    top_p: Optional[float] = bounded(None, low=0, low_open=True, high=1, null="for no nucleus filter")
    beam_width: int = at_least(1, 4, high=1024)  # one KV-cache row per beam
    draft_checkpoint: Optional[str] = None
    speculative_k: int = at_least(1, 4)  # draft tokens proposed per verification
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    quantize: str = "none"
    stream: bool = False
    device: str = "auto"
    batch_size: int = at_least(1, 8)
    compile: bool = False

    def __post_init__(self) -> None:
        self.stop = [unescape(s) for s in self.stop]
        self.prompt = unescape(self.prompt) if self.prompt is not None else None


@dataclass
class EvalSettings:
    """The keys of conf/eval.yaml (besides the `data`, `logger` and `paths` groups)."""

    checkpoint: Optional[str] = None
    tokenizer: TokenizerKey = field(default_factory=TokenizerKey)
    perplexity: bool = True
    seq_len: Optional[int] = at_least(1, None, high=MAX_SEQ_LEN, null="for the run's data.seq_len")
    batch_size: Optional[int] = at_least(1, None, null="for the run's data.micro_batch_size")
    max_batches: Optional[int] = at_least(1, None, null="for the whole split")
    tasks_file: Optional[str] = None
    task_max_new_tokens: int = at_least(1, 32, high=MAX_SEQ_LEN)
    task_stop: list[str] = field(default_factory=lambda: ["\n"])  # as conf/eval.yaml
    add_bos: bool = False
    quantize: str = "none"
    speed_repeats: int = at_least(0, 3, high=1000)  # tokens/s: best of this many timings per model; 0: not timed
    speed_new_tokens: int = at_least(1, 32, high=MAX_SEQ_LEN)  # greedy tokens per decoding timing
    device: str = "auto"
    out_dir: Optional[str] = None
    log_metrics: bool = True

    def __post_init__(self) -> None:
        self.task_stop = [unescape(s) for s in self.task_stop]


def collect(problems: list[str], fn: Callable[..., T], *args: Any) -> Optional[T]:
    """fn(*args); if it raises ConfigError or InputError, None, with its problems added to
    `problems` (so that every problem is reported at once)."""
    try:
        return fn(*args)
    except ConfigError as e:
        problems += e.problems
        return None
    except InputError as e:
        problems.append(str(e))
        return None


def typed_settings(cfg: DictConfig, schema: type) -> Any:
    """The schema's keys of `cfg` as a dataclass instance; ConfigError on values of the wrong type."""
    names = [f.name for f in dataclasses.fields(schema)]
    node = OmegaConf.masked_copy(cfg, [n for n in names if n in cfg])
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        value = OmegaConf.select(cfg, key, default=None) if key != "config" else None
        raise ConfigError([f"{key}={value!r}: {str(e).splitlines()[0]}"]) from None


def _choice(problems: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r}: not allowed. Choose one of: {', '.join(allowed)}")


def check_device(problems: list[str], device: str) -> None:
    """Devices this machine has (weight-only quantised models run on any: their weights are
    dequantised in the forward)."""
    try:
        parsed = None if device == "auto" else torch.device(device)
    except (RuntimeError, ValueError):
        problems.append(f"device={device!r}: not a device. Choose one of: auto, cpu, cuda, cuda:<index>")
        return
    if parsed is None:
        return
    if parsed.type == "cuda" and not torch.cuda.is_available():
        problems.append(f"device={device!r}: no CUDA device here; allowed: auto, cpu")
    elif parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        problems.append(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_stops(problems: list[str], key: str, stops: list[str]) -> None:
    for i, stop in enumerate(stops):
        if stop == "":
            problems.append(f"{key}[{i}]='': a stop string must be non-empty")


def _check_length(problems: list[str], key: str, tokens: int) -> None:
    """New tokens are at most the longest context a model here may have: the KV cache is
    allocated for the prompt and all of them before the first is generated."""
    if tokens > MAX_SEQ_LEN:
        problems.append(f"{key}={tokens}: must be <= {MAX_SEQ_LEN} (the longest context a model may have; the KV "
                        "cache is allocated for the prompt and every new token up front)")


def _check_file(problems: list[str], key: str, value: Optional[str]) -> None:
    """A JSONL file the key names exists and is a readable file (its content is read later)."""
    if value is None:
        return
    fix = "give a JSONL file, one JSON object per line"
    path = Path(value).expanduser()
    if not path.exists() and not path.is_symlink():
        problems.append(f"{key}={value!r}: no such file; {fix}")
        return
    collect(problems, checked_path, path, key, "file", fix)


def check_generate(s: GenerateSettings) -> list[str]:
    """Every problem of the generate settings that needs no model (checkpoints are resolved separately).
    A key that the strategy does not use is a problem; a harmless one (seed, batch_size) is a warning."""
    problems: list[str] = []
    _choice(problems, "strategy", s.strategy, STRATEGIES)
    _choice(problems, "quantize", s.quantize, QUANTIZE)
    if (s.prompt is None) == (s.prompts_file is None):
        both = "both are set" if s.prompt is not None else "neither is set"
        problems.append(f"prompt={s.prompt!r}, prompts_file={s.prompts_file!r}: give exactly one of them ({both}); "
                        "prompt='text' completes one prompt, prompts_file=<file.jsonl> one per line")
    _check_file(problems, "prompts_file", s.prompts_file)
    problems += fields.problems(s)  # every number against its declared range
    _check_length(problems, "max_new_tokens", s.max_new_tokens)
    if s.strategy == "sample" and s.temperature == 0:
        problems.append("temperature=0: strategy=sample needs temperature > 0 (temperature 0 is strategy=greedy)")
    _check_stops(problems, "stop", s.stop)
    if s.strategy == "speculative" and s.draft_checkpoint is None:
        problems.append("draft_checkpoint: required with strategy=speculative; give draft_checkpoint=<run directory | "
                        "run id | checkpoint file> (a smaller model with the same tokenizer)")
    if s.stream and s.prompts_file is not None:
        problems.append("stream=true: streams a single prompt's tokens; with prompts_file, allowed: false")
    if s.stream and s.strategy not in STREAMING_STRATEGIES:
        problems.append(f"stream=true: strategy={s.strategy} does not emit tokens one at a time (beam search revises "
                        f"its hypotheses, speculative decoding emits accepted runs); allowed with {s.strategy}: false")
    _check_unread(problems, s)
    check_device(problems, s.device)
    for note in _unused_notes(s):
        log.warning(note)
    return problems


def _shown(value: Any) -> str:
    """A value as it is written on the command line: true, not True."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _check_unread(problems: list[str], s: GenerateSettings) -> None:
    """Keys given for another strategy than the chosen one: the user meant something we would not do."""
    if s.strategy not in STRATEGIES:
        return
    default = GenerateSettings()
    for key, strategies in READ_BY.items():
        value = getattr(s, key)
        if s.strategy in strategies or value == getattr(default, key):
            continue
        if key == "temperature" and value == 0 and s.strategy == "greedy":
            continue  # greedy is sampling at temperature 0: saying so contradicts nothing
        problems.append(f"{key}={_shown(value)}: has no effect with strategy={s.strategy} (only "
                        f"{' and '.join(strategies)} use{'s' * (len(strategies) == 1)} it); drop {key}, or set "
                        f"strategy={strategies[0]}")
    if s.strategy == "speculative" and s.temperature == 0:
        for key in ("top_k", "top_p"):
            value = getattr(s, key)
            if value != getattr(default, key):
                problems.append(f"{key}={_shown(value)}: has no effect with strategy=speculative at temperature=0 (it "
                                f"decodes greedily); drop {key}, or set temperature > 0")


def _unused_notes(s: GenerateSettings) -> list[str]:
    """Keys that do nothing with the chosen strategy but are harmless to pass out of habit (a
    seed, a batch size): warned about, not refused."""
    notes, default = [], GenerateSettings()
    deterministic = s.strategy in ("greedy", "beam") or (s.strategy == "speculative" and s.temperature == 0)
    if deterministic and s.seed != default.seed:
        notes.append(f"seed={s.seed}: strategy={s.strategy}{' at temperature=0' * (s.strategy == 'speculative')} "
                     "draws no random numbers; the seed changes nothing")
    if s.strategy in ("beam", "speculative") and s.batch_size != default.batch_size:
        notes.append(f"batch_size={s.batch_size}: strategy={s.strategy} completes prompts one by one; "
                     "batch_size changes nothing")
    return notes


def check_eval(s: EvalSettings, logger_kind: str) -> list[str]:
    """Every problem of the eval settings that needs no model (checkpoint and data are checked separately)."""
    problems: list[str] = []
    _choice(problems, "quantize", s.quantize, QUANTIZE)
    _choice(problems, "logger", logger_kind, EVAL_LOGGERS)
    if not s.perplexity and s.tasks_file is None:
        problems.append("perplexity=false, tasks_file=None: nothing to evaluate; set perplexity=true or give "
                        "tasks_file=<file.jsonl> with prompt and answer fields")
    _check_file(problems, "tasks_file", s.tasks_file)
    problems += fields.problems(s)  # every number against its declared range
    _check_stops(problems, "task_stop", s.task_stop)
    if s.tasks_file is None:  # the task keys shape only the task completions: without tasks, nothing
        default = EvalSettings()
        for key in ("task_max_new_tokens", "task_stop", "add_bos"):
            value = getattr(s, key)
            if value != getattr(default, key):
                problems.append(f"{key}={_shown(value)}: has no effect without tasks_file (it shapes the task "
                                f"completions only); give tasks_file=<file.jsonl>, or drop {key}")
    check_device(problems, s.device)
    return problems
