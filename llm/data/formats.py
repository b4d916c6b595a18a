"""Post-training datasets in TRL's formats: read, detect the format, validate, render chats.

Rows come from a JSONL file, a Hugging Face dataset ("hf:NAME", the optional `datasets`
package) or any in-memory sequence of dicts (a `datasets.Dataset`, `TaskMix` rows). The format
is detected from the keys of the first row, or forced:

    format               keys                       feeds
    text                 text                       sft (every token trained)
    prompt_completion    prompt, completion         sft, prompt
    messages             messages                   sft (assistant turns trained)
    preference           prompt, chosen, rejected   preference, prompt
    implicit_preference  chosen, rejected           preference (the shared prefix is the prompt)
    prompt_only          prompt                     prompt (other keys are the reward's meta)

`prompt`, `completion`, `chosen` and `rejected` are strings, or lists of {"role", "content"}
messages ("conversational"), rendered with a chat template (llm.data.chat: chat_turn's format string
or a Jinja template). Every malformed row is reported as "FILE:LINE: what is wrong (format NAME)"
in a `DatasetError`, a ConfigError, so the CLI prints it and exits with status 2; a dataset with no
usable row is an error too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from llm.config import ConfigError
# ChatTemplate, Message and Segment live in llm.data.chat; they are importable from here as before.
from llm.data.chat import AnyChatTemplate, ChatTemplate, ChatTemplateError, Message, Segment
from llm.files import read_input_jsonl

FORMATS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "prompt_only": ("prompt",),
}
# Detection tries the formats with the most specific keys first.
DETECTION_ORDER = ("messages", "preference", "implicit_preference", "prompt_completion", "prompt_only", "text")
KINDS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt_completion", "messages", "text"),
    "preference": ("preference", "implicit_preference"),
    "prompt": ("prompt_only", "prompt_completion", "preference"),
}
MAX_REPORTED = 10  # problems listed in one error; enough to see the pattern


# What to do about a dataset file that cannot be used, whatever is wrong with it.
FIX = ("give a UTF-8 JSONL file, one JSON object per line in one of TRL's formats: "
       + "; ".join(f"{name} ({', '.join(keys)})" for name, keys in FORMATS.items()))


class DatasetError(ConfigError):
    """A post-training dataset that cannot be used: one line per problem, naming file and line,
    and (when known) the config key that named the dataset."""

    def __init__(self, problems: list[str], key: str = ""):
        super().__init__(problems)
        self.key = key
        lines = "\n".join(f"  - {p}" for p in problems)
        self.args = (f"Invalid dataset{f' {key}' if key else ''} ({len(problems)} problem{'s' * (len(problems) > 1)}):"
                     f"\n{lines}\n  fix: {FIX}",)


# ------------------------------------------------------------------ examples


@dataclass(frozen=True)
class SFTExample:
    """Text to train on, as segments: prompt/template pieces untrained, completions trained."""

    segments: tuple[Segment, ...]
    where: str = ""

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt and two completions of it, the chosen one preferred."""

    prompt: str
    chosen: str
    rejected: str
    where: str = ""


@dataclass(frozen=True)
class PromptExample:
    """A prompt to generate from, and what a reward function needs to judge the completion."""

    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""


Example = Union[SFTExample, PreferenceExample, PromptExample]


# ------------------------------------------------------------------ reading rows


@dataclass(frozen=True)
class Row:
    """One record and where it came from ("data/x.jsonl:17", "hf:name[16]")."""

    where: str
    data: Any


def read_jsonl(path: str | Path, key: str = "dataset") -> list[Row]:
    """The records of a JSONL file (blank lines skipped); lines that are not JSON raise, naming
    their number. A file that cannot be read as UTF-8 text (a directory, a broken link, binary
    bytes) is an InputError naming `key`, the config key that gave the path."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        raise DatasetError([f"{path}: no such file"], key)
    lines = read_input_jsonl(path, key, FIX, allow_empty=True)  # an empty file: "no rows", below
    problems = [f"{path}:{line.number}: not valid JSON ({line.error})" for line in lines if line.error is not None]
    if problems:
        raise DatasetError(_capped(problems))
    return [Row(f"{path}:{line.number}", line.value) for line in lines]


def load_rows(source: str | Path | Iterable[Mapping[str, Any]], hf_split: str = "train",
              hf_config: str | None = None, key: str = "dataset") -> list[Row]:
    """Rows of a JSONL path, of "hf:NAME" (datasets.load_dataset(NAME, hf_config, split=hf_split)),
    or of an in-memory sequence of dicts such as a `datasets.Dataset` or TaskMix rows."""
    if isinstance(source, str) and source.startswith("hf:"):
        return _hf_rows(source[3:], hf_split, hf_config)
    if isinstance(source, (str, Path)):
        return read_jsonl(source, key)
    name = type(source).__name__
    return [Row(f"{name}[{index}]", record) for index, record in enumerate(source)]


def _hf_rows(name: str, split: str, config_name: str | None) -> list[Row]:
    try:
        import datasets  # imported here: it is optional and slow to import
    except ImportError as e:
        raise ImportError(f"reading hf:{name} needs the `datasets` package: pip install 'llm[hf]'") from e
    dataset = datasets.load_dataset(name, config_name, split=split)
    return [Row(f"hf:{name}[{index}]", record) for index, record in enumerate(dataset)]


def detect_format(keys: Iterable[str]) -> str:
    """The TRL format whose keys are all present, the most specific first; ValueError if none."""
    keys = set(keys)
    for name in DETECTION_ORDER:
        if set(FORMATS[name]) <= keys:
            return name
    raise ValueError(f"cannot tell the format from the keys {sorted(keys)}; expected the keys of one of: "
                     + "; ".join(f"{name} ({', '.join(FORMATS[name])})" for name in DETECTION_ORDER))


# ------------------------------------------------------------------ parsing rows into examples


class _RowProblem(Exception):
    """What is wrong with one row; parse_rows adds where it is and the format."""


def _messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _RowProblem(f"{key!r} must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not m.get("role") \
                or not isinstance(m.get("content"), str):
            raise _RowProblem(f"{key}[{i}] must be {{\"role\": <non-empty string>, \"content\": <string>}}, "
                              f"got {m!r:.80}")
        messages.append(Message(m["role"], m["content"]))
    return messages


def _require(data: Mapping[str, Any], key: str) -> Any:
    if key not in data:
        raise _RowProblem(f"missing key {key!r}")
    return data[key]


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def _check_fields(data: Mapping[str, Any], keys: Sequence[str]) -> bool:
    """Every key present and all strings (False) or all conversations (True); raise otherwise."""
    for key in keys:
        if not isinstance(_require(data, key), (str, list)):
            raise _RowProblem(f"{key!r} must be a string or a list of messages, got {type(data[key]).__name__}")
    conversational = [_is_conversation(data[key]) for key in keys]
    if len(set(conversational)) > 1:
        raise _RowProblem(f"{', '.join(repr(k) for k in keys)} must all be strings or all lists of messages")
    return conversational[0]


def _completion_text(template: AnyChatTemplate, prompt: list[Message], completion: list[Message], key: str) -> str:
    """The text a conversational completion adds after the rendered prompt and generation prompt."""
    if completion[0].role != "assistant":
        raise _RowProblem(f"{key!r} must start with an assistant message, got role {completion[0].role!r}")
    return template.completion(prompt, completion)


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _sft(fmt: str, data: Mapping[str, Any], template: AnyChatTemplate, where: str) -> SFTExample:
    if fmt == "text":
        if not isinstance(_require(data, "text"), str) or not data["text"]:
            raise _RowProblem("'text' must be a non-empty string")
        return SFTExample((Segment(data["text"], True),), where)
    if fmt == "messages":
        messages = _messages(_require(data, "messages"), "messages")
        if not any(m.role == "assistant" for m in messages):
            raise _RowProblem("no assistant message to train on")
        return SFTExample(tuple(template.segments(messages)), where)
    if not _check_fields(data, ("prompt", "completion")):
        return SFTExample((Segment(data["prompt"], False), Segment(data["completion"], True)), where)
    prompt, completion = _messages(data["prompt"], "prompt"), _messages(data["completion"], "completion")
    if not any(m.role == "assistant" for m in completion):
        raise _RowProblem("'completion' has no assistant message to train on")
    return SFTExample(tuple(template.segments(prompt + completion, trained_from=len(prompt))), where)


def _preference(fmt: str, data: Mapping[str, Any], template: AnyChatTemplate, where: str) -> PreferenceExample:
    keys = FORMATS[fmt]
    conversational = _check_fields(data, keys)
    if fmt == "implicit_preference":
        chosen, rejected = data["chosen"], data["rejected"]
        if conversational:
            chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        n = _common_prefix(chosen, rejected)
        if not conversational and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
            n -= 1  # as TRL does: the space before the answers goes with them
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if conversational and (not chosen or not rejected):
            raise _RowProblem("'chosen' and 'rejected' must differ after their shared messages")
    else:
        prompt, chosen, rejected = data["prompt"], data["chosen"], data["rejected"]
        if conversational:
            prompt, chosen, rejected = (_messages(prompt, "prompt"), _messages(chosen, "chosen"),
                                        _messages(rejected, "rejected"))
    if conversational:
        prompt, chosen, rejected = (template.prompt(prompt), _completion_text(template, prompt, chosen, "chosen"),
                                    _completion_text(template, prompt, rejected, "rejected"))
    if chosen == rejected:
        raise _RowProblem("'chosen' equals 'rejected': nothing to prefer")
    return PreferenceExample(prompt, chosen, rejected, where)


def _prompt(fmt: str, data: Mapping[str, Any], template: AnyChatTemplate, where: str) -> PromptExample:
    _check_fields(data, ("prompt",))
    prompt = data["prompt"]
    text = template.prompt(_messages(prompt, "prompt")) if _is_conversation(prompt) else prompt
    if not text:
        raise _RowProblem("'prompt' is empty: there is nothing to generate from")
    return PromptExample(text, {k: v for k, v in data.items() if k != "prompt"}, where)


PARSERS = {"sft": _sft, "preference": _preference, "prompt": _prompt}


def parse_rows(rows: Sequence[Row], kind: str, format: str | None = None,
               template: AnyChatTemplate | None = None, skip_malformed: bool = False,
               source: str = "dataset") -> list[Example]:
    """Examples of `kind` ("sft", "preference" or "prompt") from rows of one format.

    The format is `format`, or detected from the keys of the first row. Malformed rows raise one
    DatasetError naming each (file:line: problem (format NAME)); with `skip_malformed` they are
    left out with a warning instead. No usable row at all is always an error.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not rows:
        raise DatasetError([f"{source}: no rows"])
    first = rows[0]
    if format is None:
        if not isinstance(first.data, Mapping):
            raise DatasetError([f"{first.where}: expected a JSON object, got {type(first.data).__name__}"])
        try:
            format = detect_format(first.data)
        except ValueError as e:
            raise DatasetError([f"{first.where}: {e}"]) from None
    if format not in FORMATS:
        raise DatasetError([f"{source}: unknown format {format!r}; expected one of {', '.join(FORMATS)}"])
    if format not in KINDS[kind]:
        raise DatasetError([f"{source}: format {format} ({', '.join(FORMATS[format])}) cannot feed {kind} "
                            f"training; it needs one of: {', '.join(KINDS[kind])}"])
    template = template or ChatTemplate()
    parse = PARSERS[kind]
    examples, problems = [], []
    for row in rows:
        try:
            if not isinstance(row.data, Mapping):
                raise _RowProblem(f"expected a JSON object, got {type(row.data).__name__}")
            examples.append(parse(format, row.data, template, row.where))
        except _RowProblem as e:
            problems.append(f"{row.where}: {e} (format {format})")
        except ChatTemplateError as e:  # a conversation the Jinja template cannot render or mask
            problems.append(f"{row.where}: {e.problems[0]}")
    if problems and not skip_malformed:
        raise DatasetError(_capped(problems))
    if problems:
        warnings.warn(f"{source}: skipped {len(problems)} malformed rows:\n" + "\n".join(_capped(problems)),
                      stacklevel=2)
    if not examples:
        raise DatasetError([f"{source}: no usable rows (format {format}, {len(rows)} rows, all malformed)"])
    return examples


def read_examples(source: str | Path | Iterable[Mapping[str, Any]], kind: str, format: str | None = None,
                  template: AnyChatTemplate | None = None, skip_malformed: bool = False,
                  hf_split: str = "train", hf_config: str | None = None, key: str = "") -> list[Example]:
    """load_rows then parse_rows: the examples of one dataset, every row checked. `key` is the
    config key that named the dataset (posttrain.data.source), for the messages."""
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    try:
        return parse_rows(load_rows(source, hf_split, hf_config, key or "dataset"), kind, format, template,
                          skip_malformed, name)
    except DatasetError as e:
        if key and not e.key:
            raise DatasetError(e.problems, key) from None
        raise


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_REPORTED:
        return problems
    return problems[:MAX_REPORTED] + [f"... and {len(problems) - MAX_REPORTED} more"]
