"""What a config field allows, declared on the field itself.

- Choices are `Choice` enums: OmegaConf refuses any other value while Hydra composes, listing the
  allowed ones. A `Choice` is a `str`, so `kind == "rope"`, dict lookups, JSON and f-strings work
  as with the plain string.
- Numeric ranges are field metadata, written with small helpers:

      lr: float = positive(3e-3, high=1.0)
      n_layers: int = at_least(1, 4, high=1024)
      dropout: float = unit_interval(0.0, high_open=True)

  `problems(instance)` walks any dataclass instance (nested ones and lists included) and reports
  every value outside its declared range or choices, as `key=value: must be ... (allowed: ...)`.

Plain Python with no Hydra, so the model's own configs (llm.model) declare their ranges here too.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, dataclass, field
from enum import Enum
from typing import Any, Callable, Optional, Union

RANGE = "range"  # the metadata key of a declared range


class Choice(str, Enum):
    """One of a fixed set of strings (member name == value, as OmegaConf matches names). It prints
    as the string does, also with !r, so messages read `kind='rope'` whatever holds the value."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


def choices(name: str, values: tuple[str, ...], module: str) -> type[Choice]:
    """A Choice whose values are not Python identifiers (e.g. Lightning's "bf16-mixed")."""
    return Choice(name, [(v, v) for v in values], module=module)  # type: ignore[return-value]


def plain(value: Any) -> Any:
    """A Choice as its plain string; anything else unchanged."""
    return value.value if isinstance(value, Choice) else value


def plain_choices(instance: Any) -> Any:
    """Replace every Choice in a dataclass instance (recursively) by its plain string, so what
    leaves the config layer pickles, and reads back, as ordinary data."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            plain_choices(value)
        elif isinstance(value, list):
            setattr(instance, f.name, [plain(v) for v in value])
        else:
            setattr(instance, f.name, plain(value))
    return instance


def _num(x: float) -> str:
    """2**20 as 1048576, not 1.04858e+06; 1e-08 as 1e-08."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """Finite numbers in [low, high] (either end open or absent). `null` says what null means,
    for fields that may be null, as a phrase after "or null" ("for no clipping")."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    null: str = ""  # e.g. "for no clipping": messages say "allowed: >= 0, or null for no clipping"

    def allowed(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = "any finite number"
        return text + (f", or null {self.null}" if self.null else "")

    def problem(self, value: Any) -> Optional[str]:
        """Why `value` is out of range, or None when it is in range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number (allowed: {self.allowed()})"
        if not math.isfinite(value):
            return f"must be finite (allowed: {self.allowed()})"
        low_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        high_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (low_bad or high_bad):
            return None
        if self.low is not None and self.high is not None:
            requirement = "in " + self.allowed().split(", or null")[0]
        elif low_bad:
            requirement = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            requirement = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return f"must be {requirement} (allowed: {self.allowed()})"


def bounded(default: Any = MISSING, *, low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, high_open: bool = False, null: str = "",
            factory: Optional[Callable[[], Any]] = None) -> Any:
    """A dataclass field with a declared range (for a list, the range of each item)."""
    metadata = {RANGE: Range(low, high, low_open, high_open, null)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def positive(default: Any = MISSING, *, high: Optional[float] = None, null: str = "", **kw: Any) -> Any:
    """> 0 (and finite)."""
    return bounded(default, low=0, low_open=True, high=high, null=null, **kw)


def at_least(low: float, default: Any = MISSING, *, high: Optional[float] = None, null: str = "", **kw: Any) -> Any:
    """>= low (and finite)."""
    return bounded(default, low=low, high=high, null=null, **kw)


def unit_interval(default: Any = MISSING, *, low_open: bool = False, high_open: bool = False, null: str = "",
                  **kw: Any) -> Any:
    """In [0, 1], either end optionally open."""
    return bounded(default, low=0, high=1, low_open=low_open, high_open=high_open, null=null, **kw)


def finite(default: Any = MISSING, *, null: str = "", **kw: Any) -> Any:
    """Any finite number (no nan, no inf)."""
    return bounded(default, null=null, **kw)


def _choice_type(annotation: Any) -> Optional[type[Choice]]:
    """The Choice in `X`, `Optional[X]` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, Choice):
        return annotation
    if typing.get_origin(annotation) in (Union, list):
        for arg in typing.get_args(annotation):
            found = _choice_type(arg)
            if found is not None:
                return found
    return None


def _item_problem(value: Any, declared: Optional[Range], choice: Optional[type[Choice]]) -> Optional[str]:
    if declared is not None:
        return declared.problem(value)
    if choice is not None and plain(value) not in choice.values():
        return f"not allowed (allowed: {', '.join(choice.values())})"
    return None


def problems(instance: Any, prefix: str = "") -> list[str]:
    """Every value of a dataclass instance outside its declared range or choices, one line each:
    `key=value: must be ... (allowed: ...)`. Null is always allowed here (the field's type says
    whether it may be null, and OmegaConf checks types)."""
    found: list[str] = []
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            found += problems(value, key)
            continue
        if value is None:
            continue
        declared: Optional[Range] = f.metadata.get(RANGE)
        choice = _choice_type(hints.get(f.name))
        if isinstance(value, (list, tuple)):  # each item; the message shows the whole list
            for index, item in enumerate(value):
                why = _item_problem(item, declared, choice)
                if why:
                    found.append(f"{key}={[plain(v) for v in value]!r}: [{index}]={plain(item)!r} {why}")
        else:
            why = _item_problem(value, declared, choice)
            if why:
                found.append(f"{key}={plain(value)!r}: {why}")
    return found


def numeric_keys(schema: type, prefix: str = "") -> dict[str, Range]:
    """Every key of a schema with a declared range (nested dataclasses included), and its range."""
    keys: dict[str, Range] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        nested = hints.get(f.name)
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            keys.update(numeric_keys(nested, key))
        elif RANGE in f.metadata:
            keys[key] = f.metadata[RANGE]
    return keys
