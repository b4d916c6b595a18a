"""A checkpoint's network as a plain `nn.Module`: a `Transformer` (language model) or a
`ValueModel` (reward model, critic), built from the model config the checkpoint carries.

Files are read with `torch.load(weights_only=True)`; sharded FSDP/TP directories with torch's
public `torch.distributed.checkpoint.load` in this one process (no process group), only the
network's tensors (the shards' index unpickled by `llm.checkpoint.safe_reader`); a checkpoint of
LoRA adapters is folded onto its parent's weights; a Hugging Face folder is converted by
`llm.interop.hf`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from llm.checkpoint.meta import CheckpointMeta, is_sharded, unreadable, why_unreadable
from llm.checkpoint.refs import HF_CONFIG, CheckpointRef, resolve
from llm.config import ConfigError
from llm.files import read_input_json
from llm.model import ModelConfig
from llm.model.lora import LoRAConfig, apply_lora, merge_lora
from llm.model.value import build_network, load_weights
from llm.run.layout import TOKENIZER_FILE, RunDir

if TYPE_CHECKING:
    from llm.checkpoint.parent import Parent
    from llm.tokenizer import Tokenizer

PREFIX = "model."  # the LightningModule holds the network as `self.model`
SHARDED_PREFIX = f"state_dict.{PREFIX}"  # Lightning saves {"state_dict": ..., "optimizer_0": ...}; DCP flattens it


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The network's tensors in a checkpoint (file or sharded directory), keyed as the network's
    own state dict (without Lightning's `model.` prefix); optimizer states are not read."""
    path = Path(path)
    if is_sharded(path):
        return _read_sharded_weights(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k.removeprefix(PREFIX): v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(PREFIX)}


def _read_sharded_weights(directory: Path) -> dict[str, Tensor]:
    """Whole tensors from the shards, of the global shapes the checkpoint's metadata records."""
    from llm.checkpoint.safe_reader import read_entries

    state, _ = read_entries(directory, include=lambda fqn: fqn.startswith(SHARDED_PREFIX))
    return {k.removeprefix(SHARDED_PREFIX): v for k, v in state.items() if isinstance(v, Tensor)}


def load_network(source: CheckpointRef | str | Path, device: str | torch.device = "cpu", key: str = "checkpoint",
                 value_head: Optional[bool] = None) -> nn.Module:
    """The network of a checkpoint reference (or of anything `resolve` accepts), in eval mode on
    `device`. `value_head` True/False refuses (ConfigError naming `key`) the other kind of network:
    a command that generates text needs a language model, not a reward model."""
    ref = source if isinstance(source, CheckpointRef) else resolve(source, ".", key)
    if ref.kind == "hf":
        model = import_folder(ref.path, key)[0]
        stage, is_value = "hf", False
    else:
        meta = CheckpointMeta.read(ref.path, key)
        model = _network(ref.path, meta, key)
        stage, is_value = meta.stage, meta.value_head
    if value_head is not None and value_head != is_value:
        what = "a reward/value model" if is_value else "a language model"
        raise ConfigError([f"{key}: {ref.path} is {what} (stage {stage}); this needs "
                           f"{'a reward/value model' if value_head else 'a language model'}"])
    return model.to(device).eval()


def _network(path: Path, meta: CheckpointMeta, key: str) -> nn.Module:
    weights = _read_checked(path, key)
    model = build_network(meta.model_config, meta.value_head)
    if meta.lora is None:
        _load_whole(model, weights, path, key)
        return model
    # Adapters only: the frozen base is the parent's network.
    if meta.parent is None or not meta.parent.exists():
        raise ConfigError([f"{key}: {path} holds LoRA adapters only, and their base ({meta.parent}) is gone; give the "
                           "run directory instead (its checkpoints/merged.ckpt has the merged model)"])
    parent_ref = resolve(meta.parent, ".", f"{key}'s parent")  # a checkpoint, or the Hugging Face folder a stage began from
    parent_value_head = parent_ref.kind != "hf" and CheckpointMeta.read(parent_ref.path, f"{key}'s parent").value_head
    parent = load_network(parent_ref, key=f"{key}'s parent")
    load_weights(model, parent.state_dict(), parent_value_head)
    return fold_lora(model, meta.lora, meta.value_head, weights, path)


def _read_checked(path: Path, key: str) -> dict[str, Tensor]:
    try:
        return read_weights(path)
    except Exception as e:  # torch raises several kinds on torn files and missing shards
        raise ConfigError([unreadable(key, path, why_unreadable(path, e))]) from e


def _load_whole(model: nn.Module, weights: dict[str, Tensor], path: Path, key: str) -> None:
    """Every tensor of the network from `weights` (a tied head may be absent: it is the embedding)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError([f"{key}: {path} does not fit the architecture it names (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}); a LoRA run's last.ckpt holds adapters only: give "
                           "its run directory"])


def fold_lora(model: nn.Module, lora: LoRAConfig, value_head: bool, trained: dict[str, Tensor],
              where: str | Path) -> nn.Module:
    """`model` holds the base weights: adapt it as the stage did (the same targets; a value
    model's head trained in full), load what training changed, and merge the adapters into the
    base weights, leaving an ordinary network."""
    apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets,
               train_modules=[*lora.train_modules, *(["head"] if value_head else [])])
    missing = [k for k in model.state_dict() if k not in trained and ("lora_a" in k or "lora_b" in k)]
    if missing:
        raise ValueError(f"{where}: the LoRA adapters {missing[:3]} are missing")
    model.load_state_dict(trained, strict=False)
    return merge_lora(model)


def load_trained_network(run_dir: str | Path, parent: Parent, model_config: ModelConfig, lora: LoRAConfig,
                         value_head: bool) -> nn.Module:
    """The network a post-training run just trained, from its last.ckpt (a file or shards), as a
    plain module in eval mode: with LoRA, the adapters folded into the parent's weights."""
    path = RunDir(run_dir).last_checkpoint
    weights = read_weights(path)
    model = build_network(model_config, value_head)
    if lora.enabled:
        load_weights(model, parent.state, parent.value_head)
        fold_lora(model, lora, value_head, weights, path)
    else:
        model.load_state_dict(weights)
    return model.eval()


def import_folder(folder: Path, key: str) -> tuple[nn.Module, Optional[Tokenizer]]:
    """A Hugging Face folder's model and tokenizer (`llm.interop.hf.import_hf`); ConfigError naming `key`."""
    from llm.interop.hf import import_hf

    try:
        return import_hf(folder, key)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError([f"{key}: {folder}: {e}"]) from e


def load_tokenizer(path: str | Path, key: str = "tokenizer.path") -> Tokenizer:
    """Our Tokenizer from a tokenizer.json: one we saved, or a Hugging Face folder's (config.json
    beside it), whose special tokens become ours (`llm.interop.hf_tokenizer`). InputError naming
    `key` for a file that is not what it should be."""
    path = Path(path)
    if path.name == TOKENIZER_FILE and (path.parent / HF_CONFIG).is_file():
        from llm.interop.hf_tokenizer import read_tokenizer

        config = read_input_json(path.parent / HF_CONFIG, key, "give a Hugging Face model folder or a run directory")
        return read_tokenizer(path.parent, config)
    from llm.tokenizer import Tokenizer

    return Tokenizer.load(path, key)
