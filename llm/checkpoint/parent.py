"""The checkpoint a post-training stage starts from (`init_from=`, `posttrain.reward_model=`):
its architecture, weights, kind of network and tokenizer, loaded once."""

from __future__ import annotations

import hashlib
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
from llm.run.layout import CHAT_TEMPLATE_FILE, TOKENIZER_FILE


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


def load_parent(value: Optional[str], runs_dir: str | Path, key: str = "init_from",
                cache_dir: Optional[str | Path] = None) -> Parent:
    """The checkpoint `value` names (anything `resolve` accepts), loaded; ConfigError naming `key`
    otherwise. A Hugging Face folder is imported on the fly (`hf_parent`)."""
    ref = resolve(value, runs_dir, key)
    if ref.kind == "hf":
        return hf_parent(ref, Path(cache_dir if cache_dir is not None else Path(runs_dir).parent / ".cache"),
                         f"{key}={value!r}")
    meta = CheckpointMeta.read(ref.path, f"{key}={value!r}")
    tokenizer = tokenizer_file(ref, None, key=f"{key}'s tokenizer")
    network = load_network(ref, key=f"{key}={value!r}")
    return Parent(ref, meta.stage, meta.model_config, network.state_dict(), meta.value_head, tokenizer)


def hf_parent(ref: CheckpointRef, cache_dir: Path, key: str) -> Parent:
    """A Hugging Face folder as a parent, as `llm-hf import` would convert it: the weights in our
    layout and its tokenizer with our special tokens (`llm.interop.hf_tokenizer`). The converted
    tokenizer.json (and the folder's chat template, as chat_template.jinja) is kept under
    `cache_dir/hf_tokenizers/<hash of both>/`, the one file every
    later reader of the run's tokenizer config (and a resume) loads, like a trained tokenizer."""
    from llm.checkpoint.load import import_folder

    model, tokenizer = import_folder(ref.path, key)
    if tokenizer is None:
        raise ConfigError([f"{key}: the Hugging Face folder {ref.path} has no {TOKENIZER_FILE}; a stage needs the "
                           "model's tokenizer: add it to the folder (save_pretrained of the tokenizer writes it)"])
    from llm.data.chat import read_chat_template
    from llm.files import write_text

    template = read_chat_template(ref.path, key)  # kept beside, where posttrain.data.chat_template=tokenizer looks
    digest = hashlib.sha256(f"{tokenizer.content_hash()}\n{template}".encode()).hexdigest()[:16]
    path = cache_dir / "hf_tokenizers" / digest / TOKENIZER_FILE
    if template is not None and not (path.parent / CHAT_TEMPLATE_FILE).is_file():
        write_text(path.parent / CHAT_TEMPLATE_FILE, template)
    if not path.is_file():  # written last: a folder with tokenizer.json is complete
        tokenizer.save(path)
    return Parent(ref, "hf", model.cfg, model.state_dict(), False, path)
