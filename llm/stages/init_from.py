"""`init_from=<run dir | run id | checkpoint>`: where a post-training stage starts.

The checkpoint brings its architecture (the model config it was saved with), its weights and its
run's tokenizer (llm.checkpoint.load_parent); the command line may not contradict the
architecture, which `check_architecture` enforces.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from llm.checkpoint.meta import flatten
from llm.config import ConfigError
from llm.model import ModelConfig

# Keys a stage may still set although the checkpoint fixes the architecture: they change how the
# model runs, not what its weights mean.
RUNTIME_KEYS = ("dropout", "attention.kernel",
                # MoE training knobs: how the router is trained and how many assignments a batch drops
                "moe.aux_loss_coef", "moe.z_loss_coef", "moe.bias_update_rate", "moe.capacity_factor")


def check_architecture(model: ModelConfig, overrides: list[str], key: str = "init_from") -> None:
    """A command-line override of an architecture key must agree with the checkpoint."""
    saved = flatten(asdict(model))
    problems = []
    for override in overrides:
        name, _, value = override.lstrip("+~").partition("=")
        if name in ("model", "attention", "position"):
            # What the checkpoint has instead: the group's section, or the model's shape.
            has = {k: v for k, v in saved.items()
                   if k.startswith(f"{name}.") or (name == "model" and k in ("n_layers", "d_model", "n_heads"))}
            problems.append(f"{name}={value}: the architecture comes from {key}, whose checkpoint has "
                            + ", ".join(f"{k}={v!r}" for k, v in has.items()) + "; remove this group override")
            continue
        if not name.startswith("model."):
            continue
        field = name.removeprefix("model.")
        if field in RUNTIME_KEYS or field not in saved:
            continue
        if str(saved[field]).lower() != value.strip().lower() and not _same_number(saved[field], value):
            problems.append(f"{name}={value}: conflicts with the checkpoint of {key}, which has {field}="
                            f"{saved[field]!r}; remove the override (the architecture comes from the checkpoint)")
    if problems:
        raise ConfigError(problems)


def _same_number(a: Any, b: str) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False
