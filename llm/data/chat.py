"""Chat templates: how a conversation becomes text, and which of its characters are trained.

Two kinds render a list of {"role", "content"} messages, with the same interface (`segments`,
`render`, `prompt`, `jinja_source`):

- `ChatTemplate`: one format string per turn (`posttrain.data.chat_turn`, default
  "{role}: {content}\\n"), the simple default.
- `JinjaChatTemplate`: a Jinja chat template (`posttrain.data.chat_template`), rendered as
  transformers' `apply_chat_template` renders it: jinja2's ImmutableSandboxedEnvironment with
  trim_blocks and lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`, and the variables
  `messages`, `add_generation_prompt`, `tools`, `documents` (None) and the tokenizer's `bos_token`,
  `eos_token`, `pad_token`. A template cannot run code: any unsafe attribute access (`__class__`
  and the like) is an error, not an empty string as in a plain sandbox.

Assistant-only loss (TRL's `assistant_only_loss`): an assistant message's trained text is its
content plus whatever the template appends to its turn (e.g. "<|im_end|>\\n"); everything else (the
other roles' turns, the assistant header) is masked. For Jinja templates the spans are found by
rendering prefixes, not from `{% generation %}` blocks: the trained text of message i is what
render(messages[:i+1]) adds to render(messages[:i], add_generation_prompt=True). That needs no
special markup in the template and gives the same answer for any template that renders a turn the
same whatever follows it ("prefix-stable"); a template that is not (e.g. one that rewrites earlier
turns once a later one exists) is refused with the place where the renderings differ.
`{% generation %}...{% endgeneration %}` is accepted and renders its body, as in transformers; where
it marks an assistant turn's content and end, transformers' `return_assistant_tokens_mask` gives
the same mask (tests/test_chat_template.py).

`jinja_source` gives, for either kind, a Jinja template that renders exactly what the run rendered;
a run that read conversations writes it to <run>/chat_template.jinja for the HF export.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from llm.config import ConfigError
from llm.files import InputError, checked_path, read_input_json, read_input_text
from llm.run.layout import CHAT_TEMPLATE_FILE

DEFAULT_TURN = "{role}: {content}\n"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # where Hugging Face tokenizers keep their chat_template
FROM_TOKENIZER = "tokenizer"  # chat_template=tokenizer: the parent tokenizer's own template
# Rendered once when a Jinja template is given, so its problems show before any row is read.
TRIAL = ({"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"})
MIN_JINJA = (3, 1, 6)  # older versions have known sandbox escapes (transformers requires it too)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text; `trained` pieces are what the loss is computed on."""

    text: str
    trained: bool


class ChatTemplateError(ConfigError):
    """A conversation the chat template cannot render (or cannot mask): one problem, naming the key."""

    def __init__(self, problem: str):
        super().__init__([problem])


def _merged(pieces: list[Segment]) -> list[Segment]:
    """Neighbouring segments with the same `trained` flag joined, empty ones dropped."""
    merged: list[Segment] = []
    for piece in pieces:
        if merged and merged[-1].trained == piece.trained:
            merged[-1] = Segment(merged[-1].text + piece.text, piece.trained)
        elif piece.text:
            merged.append(piece)
    return merged


# ------------------------------------------------------------------ format-string template


class ChatTemplate:
    """Renders messages as text with one format string per turn.

    `turn` has a {role} and exactly one {content} placeholder, e.g. the default
    "{role}: {content}\\n". `generation_prompt` opens an assistant turn: the model writes after it;
    by default it is what `turn` renders before an assistant's content ("assistant: "). Assistant
    turns are rendered as generation_prompt + content + the rest of `turn`, so training and
    generation see the same text; the content and the rest of the turn are the trained tokens.
    `used` says whether anything was rendered (a run writes its template only then).
    """

    def __init__(self, turn: str = DEFAULT_TURN, generation_prompt: str | None = None,
                 key: str = "posttrain.data.chat_turn"):
        problem = f"{key}={turn!r}: needs exactly one {{content}} and no placeholder other than {{role}}"
        try:
            parsed = list(string.Formatter().parse(turn))
        except ValueError as e:  # a lone "{" or "}": braces meant literally are written {{ and }}
            raise ConfigError([f"{problem} ({e}; write a literal brace as {{{{ or }}}})"]) from None
        fields = [(name, spec, conversion) for _, name, spec, conversion in parsed if name is not None]
        names = [name for name, _, _ in fields]
        if names.count("content") != 1 or set(names) - {"role", "content"} or turn.count("{content}") != 1:
            raise ConfigError([problem])
        if any(spec or conversion for _, spec, conversion in fields):  # Jinja has no equivalent of them
            raise ConfigError([f"{key}={turn!r}: {{role}} and {{content}} take no format spec or conversion"])
        self.turn, self.key = turn, key
        self._before, self._after = turn.split("{content}")
        if generation_prompt is None:
            generation_prompt = self._before.format(role="assistant")
        self.generation_prompt = generation_prompt
        self.used = False

    def __repr__(self) -> str:
        return f"ChatTemplate(turn={self.turn!r}, generation_prompt={self.generation_prompt!r})"

    def segments(self, messages: Sequence[Message], trained_from: int = 0) -> list[Segment]:
        """The rendered conversation; assistant turns at index >= trained_from are trained."""
        self.used = True
        pieces = []
        for index, m in enumerate(messages):
            if m.role == "assistant":
                pieces.append(Segment(self.generation_prompt, False))
                pieces.append(Segment(m.content + self._after.format(role=m.role), index >= trained_from))
            else:
                text = self._before.format(role=m.role) + m.content + self._after.format(role=m.role)
                pieces.append(Segment(text, False))
        return _merged(pieces)

    def render(self, messages: Sequence[Message]) -> str:
        return "".join(s.text for s in self.segments(messages))

    def prompt(self, messages: Sequence[Message]) -> str:
        """The conversation so far, then the generation prompt: what the model continues."""
        return self.render(messages) + self.generation_prompt

    def completion(self, prompt: Sequence[Message], completion: Sequence[Message]) -> str:
        """The text `completion` adds after `prompt` and the generation prompt."""
        return self.render([*prompt, *completion])[len(self.prompt(prompt)):]

    def jinja_source(self) -> str:
        """A Jinja template that renders exactly as this one: every literal piece a Jinja string,
        all whitespace between tags stripped, so trim_blocks/lstrip_blocks change nothing."""
        before, after, generation = _jinja_text(self._before), _jinja_text(self._after), _jinja_string(
            self.generation_prompt)
        return ("{#- posttrain.data.chat_turn = " + _comment(self.turn) + ", generation_prompt = "
                + _comment(self.generation_prompt) + " -#}\n"
                "{%- for message in messages -%}\n"
                "  {%- if message['role'] == 'assistant' -%}\n"
                f"    {{{{- {generation} -}}}}\n"
                "  {%- else -%}\n"
                f"    {{{{- {before} -}}}}\n"
                "  {%- endif -%}\n"
                f"  {{{{- message['content'] -}}}}\n"
                f"  {{{{- {after} -}}}}\n"
                "{%- endfor -%}\n"
                "{%- if add_generation_prompt -%}\n"
                f"  {{{{- {generation} -}}}}\n"
                "{%- endif -%}\n")


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal. Jinja decodes literals with Python's unicode-escape (and
    turns raw line breaks into \\n), so everything but printable ASCII is written as an escape."""
    out = []
    for c in text:
        code = ord(c)
        if c in '"\\':
            out.append("\\" + c)
        elif c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif 0x20 <= code < 0x7F:
            out.append(c)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _jinja_text(part: str) -> str:
    """A Jinja expression for one side of a format-string turn: its literals and {role}s joined."""
    terms = []
    for literal, name, _, _ in string.Formatter().parse(part):
        if literal:
            terms.append(_jinja_string(literal))
        if name is not None:  # "role" (the constructor allows nothing else here)
            terms.append("message['role']")
    return " + ".join(terms) or '""'


def _comment(text: str) -> str:
    """`text` for a Jinja comment: printable, and unable to close it."""
    return repr(text).replace("#}", "# }")


# ------------------------------------------------------------------ Jinja template


def _check_jinja_version() -> None:
    import jinja2

    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_JINJA:
        raise ImportError(f"chat templates need jinja2>={'.'.join(map(str, MIN_JINJA))} (older ones have sandbox "
                          f"escapes), found {jinja2.__version__}: pip install -U jinja2")


@lru_cache(maxsize=None)
def _environment() -> Any:
    """transformers' chat-template environment (its `_compile_jinja_template`), but refusing unsafe
    attribute access outright."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    _check_jinja_version()

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            # A plain sandbox renders `''.__class__` as an empty string; a template that tries is refused.
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    class Generation(Extension):
        """{% generation %}...{% endgeneration %} (transformers' assistant-mask markup): its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # transformers' tojson: no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _difference(a: str, b: str) -> str:
    """Where two renderings part: the character index and a little of each from there."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return f"at character {n}: {a[n:n + 40]!r} vs {b[n:n + 40]!r}"


class JinjaChatTemplate:
    """A Jinja chat template (see the module docstring for how it renders and masks).

    `special_tokens` are the tokenizer's bos_token / eos_token / pad_token strings. The template is
    compiled and tried on a user/assistant exchange here, so a bad one is a ConfigError naming `key`
    before any row is read; a row it cannot render is a ChatTemplateError (a ConfigError) too.
    """

    def __init__(self, source: str, special_tokens: Optional[Mapping[str, str]] = None,
                 key: str = "posttrain.data.chat_template"):
        import jinja2

        from llm.tokenizer.tokenizer import BOS, EOS, PAD

        self.source, self.key = source, key
        self.variables = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, **(special_tokens or {})}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError([f"{key}: not a valid Jinja template: {e.message} (line {e.lineno}); fix the "
                               "template, or set it to null to render chats with chat_turn"]) from None
        trial = [Message(**m) for m in TRIAL]
        self.segments(trial)
        if not self.prompt(trial[:1]):
            raise ConfigError([f"{key}: the template renders nothing for a user message and a generation prompt"])
        self.used = False

    def __repr__(self) -> str:
        return f"JinjaChatTemplate({self.source[:60]!r}{'...' if len(self.source) > 60 else ''})"

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                         tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                                         **self.variables)
        except Exception as e:  # the template is the user's code: whatever it raises is the template's problem
            raise ChatTemplateError(f"{self.key}: the template failed on a conversation of "
                                    f"{len(messages)} message(s) ({type(e).__name__}: {e})") from None

    def segments(self, messages: Sequence[Message], trained_from: int = 0) -> list[Segment]:
        """The rendered conversation; assistant turns at index >= trained_from are trained: what
        each adds to the rendering of the messages before it and the generation prompt."""
        self.used = True
        full = self._render(messages, False)
        pieces, done = [], 0
        for i, m in enumerate(messages):
            if m.role != "assistant" or i < trained_from:
                continue
            opened = self._render(messages[:i], True)
            turn = self._render(messages[:i + 1], False)
            if not turn.startswith(opened):
                raise self._unstable(f"messages[:{i + 1}]", f"messages[:{i}] with the generation prompt", turn, opened)
            if not full.startswith(turn):
                raise self._unstable(f"all {len(messages)} messages", f"messages[:{i + 1}]", full, turn)
            if len(opened) < done:
                raise ChatTemplateError(f"{self.key}: the template is not prefix-stable: message {i} (assistant) "
                                        "renders before the end of the previous assistant turn")
            pieces += [Segment(full[done:len(opened)], False), Segment(full[len(opened):len(turn)], True)]
            done = len(turn)
        pieces.append(Segment(full[done:], False))
        return _merged(pieces)

    def _unstable(self, longer: str, shorter: str, a: str, b: str) -> ChatTemplateError:
        return ChatTemplateError(
            f"{self.key}: the template is not prefix-stable: its rendering of {longer} does not start with its "
            f"rendering of {shorter} ({_difference(a, b)}); the assistant-only loss needs each turn rendered the "
            "same whatever follows it: use a template that does, or chat_template=null (chat_turn)")

    def render(self, messages: Sequence[Message]) -> str:
        self.used = True
        return self._render(messages, False)

    def prompt(self, messages: Sequence[Message]) -> str:
        """The conversation rendered with add_generation_prompt=True: what the model continues."""
        self.used = True
        return self._render(messages, True)

    def completion(self, prompt: Sequence[Message], completion: Sequence[Message]) -> str:
        """The text `completion` adds after `prompt` and the generation prompt (as TRL cuts a
        conversational preference pair); a template whose rendering does not extend the prompt's is refused."""
        opened, full = self.prompt(prompt), self.render([*prompt, *completion])
        if not full.startswith(opened):
            raise self._unstable(f"the prompt's {len(prompt)} messages and the completion's {len(completion)}",
                                 "the prompt with the generation prompt", full, opened)
        return full[len(opened):]

    def jinja_source(self) -> str:
        return self.source


AnyChatTemplate = Union[ChatTemplate, JinjaChatTemplate]


def jinja_source(template: AnyChatTemplate) -> str:
    """A Jinja chat template that renders exactly as `template` did (for a Hugging Face export:
    transformers' apply_chat_template gives the same text, given the same special tokens)."""
    return template.jinja_source()


# ------------------------------------------------------------------ from config and from disk


def read_chat_template(folder: str | Path, key: str = "chat_template") -> Optional[str]:
    """The chat template kept in a tokenizer's folder: its chat_template.jinja file, else the
    `chat_template` of its tokenizer_config.json (a string, or transformers' list of named
    templates: the one named "default"); None when it has neither. Files that cannot be read are
    InputErrors naming `key`."""
    folder = Path(folder).expanduser()
    fix = "give a UTF-8 Jinja template"
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.exists() or jinja.is_symlink():
        return read_input_text(jinja, key, fix)
    config_file = folder / TOKENIZER_CONFIG_FILE
    if not (config_file.exists() or config_file.is_symlink()):
        return None
    value = read_input_json(config_file, key, f"{fix} as its chat_template").get("chat_template")
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
        if value is None:
            raise InputError(f"{key}: {config_file} has named chat templates but none named 'default'; give the one "
                             "to use as the template itself")
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise InputError(f"{key}: {config_file}'s chat_template is {value!r:.60}, not a Jinja template")
    return value


def _is_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def build_chat_template(data: Any, tokenizer_folder: Optional[Path] = None,
                        special_tokens: Optional[Mapping[str, str]] = None,
                        prefix: str = "posttrain.data") -> AnyChatTemplate:
    """The template `data` (a PostTrainDataSchema) asks for: chat_turn's when chat_template is
    null; else a Jinja template given as its text, as a .jinja file or tokenizer folder, or as
    "tokenizer" (the one in `tokenizer_folder`, the parent tokenizer's). ConfigError/InputError
    naming the key for anything that cannot work."""
    key = f"{prefix}.chat_template"
    value = data.chat_template
    if value is None:
        return ChatTemplate(data.chat_turn, data.generation_prompt, key=f"{prefix}.chat_turn")
    problems = []
    if data.chat_turn != DEFAULT_TURN:
        problems.append(f"{prefix}.chat_turn={data.chat_turn!r} and {key} are both given, but a run renders chats "
                        f"one way: drop chat_turn (its default is {DEFAULT_TURN!r}), or set {key}=null")
    if data.generation_prompt is not None:
        problems.append(f"{prefix}.generation_prompt={data.generation_prompt!r} is for chat_turn; a Jinja template's "
                        f"generation prompt is what it renders for add_generation_prompt: set it to null, or "
                        f"{key}=null")
    if not value.strip():
        problems.append(f"{key}={value!r}: empty; give a Jinja template, a .jinja file, '{FROM_TOKENIZER}' or null")
    if problems:
        raise ConfigError(problems)
    source = value
    if value == FROM_TOKENIZER:
        if tokenizer_folder is None:
            raise ConfigError([f"{key}={FROM_TOKENIZER}: there is no parent tokenizer to take it from"])
        source = read_chat_template(tokenizer_folder, key)
        if source is None:
            raise ConfigError([f"{key}={FROM_TOKENIZER}: the parent's tokenizer folder {tokenizer_folder} has no chat "
                               f"template (no {CHAT_TEMPLATE_FILE}, no chat_template in {TOKENIZER_CONFIG_FILE}); give "
                               f"the template itself or a .jinja file, or {key}=null to use chat_turn"])
    elif not _is_template(value):  # a path: a template file, or a tokenizer folder holding one
        fix = f"give a Jinja template (with {{{{ }}}} or {{% %}}), a .jinja file, '{FROM_TOKENIZER}' or null"
        path = Path(value).expanduser()
        if path.is_dir():
            source = read_chat_template(checked_path(path, key, "dir", fix), key)
            if source is None:
                raise ConfigError([f"{key}={value!r}: a folder with no {CHAT_TEMPLATE_FILE} and no chat_template in a "
                                   f"{TOKENIZER_CONFIG_FILE}; {fix}"])
        else:
            source = read_input_text(path, key, fix)
    return JinjaChatTemplate(source, special_tokens, key=key)
