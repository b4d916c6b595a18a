"""The checkpoint a post-training stage starts from (`init_from=`, `posttrain.reward_model=`):
its architecture, weights, kind of network and tokenizer, loaded once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from llm.checkpoint.load import load_network
from llm.checkpoint.meta import CheckpointMeta
from llm.checkpoint.refs import CheckpointRef, resolve, tokenizer_file
from llm.config import ConfigError
from llm.model import ModelConfig
from llm.model.value import build_network, load_weights


@dataclass
class Parent:
    """A stage's starting checkpoint: where it is, what it is, and its weights."""

    ref: CheckpointRef
    stage: str
    model_config: ModelConfig
    state: dict[str, torch.Tensor]  # the trained network's weights (LoRA adapters already folded in)
    value_head: bool  # a reward model / critic (ValueModel) rather than a language model
    tokenizer_path: Path

    def load(self, value_head: bool) -> nn.Module:
        """A network of this architecture with these weights: a language model, or a value model
        (from a value model's weights, or a language model's with a fresh head)."""
        model = build_network(self.model_config, value_head)
        load_weights(model, self.state, self.value_head)
        return model

    def facts(self) -> dict[str, Any]:
        """What a run records about its parent (summary.json, W&B config)."""
        return {"parent_checkpoint": str(self.ref.path), "parent_run_id": self.ref.run_id, "parent_stage": self.stage}


def load_parent(value: Optional[str], runs_dir: str | Path, key: str = "init_from") -> Parent:
    """The checkpoint `value` names (anything `resolve` accepts but a Hugging Face folder, whose
    tokenizer must first become ours), loaded; ConfigError naming `key` otherwise."""
    ref = resolve(value, runs_dir, key)
    if ref.kind == "hf":
        raise ConfigError([f"{key}={value!r}: {ref.path} is a Hugging Face folder; convert it first with "
                           f"`llm-hf import {ref.path} <dir>/model.ckpt` (which writes our tokenizer.json beside it) "
                           f"and give {key}=<dir>/model.ckpt"])
    meta = CheckpointMeta.read(ref.path, f"{key}={value!r}")
    tokenizer = tokenizer_file(ref, None, key=f"{key}'s tokenizer")
    network = load_network(ref, key=f"{key}={value!r}")
    return Parent(ref, meta.stage, meta.model_config, network.state_dict(), meta.value_head, tokenizer)
