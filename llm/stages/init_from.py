"""`init_from=<run dir | run id | checkpoint>`: where a post-training stage starts.

The checkpoint brings its architecture (the model config it was saved with), its weights and its
run's tokenizer; the command line may not contradict the architecture. A run directory stands
for its final model: `checkpoints/merged.ckpt` after LoRA training (adapters folded into the
base weights), otherwise `checkpoints/last.ckpt`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from llm.config import ConfigError
from llm.evaluate.checkpoint import CheckpointRef, resolve_checkpoint, tokenizer_file
from llm.model import ModelConfig

MERGED = "merged.ckpt"  # a LoRA run's export: base + adapters as one ordinary checkpoint

# Keys a stage may still set although the checkpoint fixes the architecture: they change how the
# model runs, not what its weights mean.
RUNTIME_KEYS = ("dropout", "attention.kernel")


@dataclass
class Parent:
    """A stage's starting checkpoint: where it is, what it is, and its weights."""

    ref: CheckpointRef
    stage: str
    model_config: ModelConfig
    state: dict[str, torch.Tensor]  # the trained network's weights, without the "model." prefix
    value_head: bool  # a reward model / critic (ValueModel) rather than a language model
    tokenizer_path: Path

    def load(self, value_head: bool) -> torch.nn.Module:
        """A network of this architecture with these weights: a language model, or a value model
        (from a value model's weights, or a language model's with a fresh head)."""
        from llm.model.value import build_network, load_weights

        model = build_network(self.model_config, value_head)
        load_weights(model, self.state, self.value_head)
        return model

    def facts(self) -> dict[str, Any]:
        """What a run records about its parent (summary.json, W&B config)."""
        return {"parent_checkpoint": str(self.ref.path), "parent_run_id": self.ref.run_id, "parent_stage": self.stage}


def resolve(value: Optional[str], runs_dir: str | Path, key: str = "init_from") -> CheckpointRef:
    path = Path(str(value)).expanduser() if value else None
    if path is not None and (path / "checkpoints" / MERGED).is_file():
        return CheckpointRef((path / "checkpoints" / MERGED).resolve(), path.resolve())
    return resolve_checkpoint(value, runs_dir, key)


def load_parent(value: Optional[str], runs_dir: str | Path, key: str = "init_from") -> Parent:
    ref = resolve(value, runs_dir, key)
    checkpoint = torch.load(ref.path, map_location="cpu", weights_only=True)
    meta = checkpoint.get("llm")
    if not meta or "model_config" not in meta:
        raise ConfigError([f"{key}={value!r}: {ref.path} was not written by llm-train (no model config in it)"])
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise ConfigError([f"{key}={value!r}: {ref.path} holds no model weights (a LoRA run's adapters only? "
                           f"give its run directory, whose checkpoints/{MERGED} has the merged model)"])
    return Parent(ref, meta.get("stage", "pretrain"), ModelConfig.from_dict(meta["model_config"]), state,
                  bool(meta.get("value_head", False)), tokenizer_file(ref, None, key="init_from's tokenizer"))


def check_architecture(model: ModelConfig, overrides: list[str], key: str = "init_from") -> None:
    """A command-line override of an architecture key must agree with the checkpoint."""
    saved = _flatten(asdict(model))
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


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _same_number(a: Any, b: str) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False
