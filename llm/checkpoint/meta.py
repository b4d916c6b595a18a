"""What a checkpoint says about itself, read without its tensors.

A checkpoint is a Lightning checkpoint: one `torch.save` file (single process, DDP, a merged LoRA
export, `llm-consolidate` output), or a `torch.distributed.checkpoint` directory of shards whose
non-tensor part is `meta.pt` (FSDP/TP). Either way the non-tensor part holds `global_step`, the
loop state, and our `llm` dict: stage, model_config, value_head, lora, parent. Everything is read
with `torch.load(weights_only=True)`, and a sharded directory's index (`.metadata`) with an
allowlisting unpickler (`llm.checkpoint.safe_reader`): nothing on disk is unpickled beyond
tensors, plain types and torch's checkpoint metadata.
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from llm.config import ConfigError
from llm.model import ModelConfig
from llm.model.lora import LoRAConfig
from llm.run.layout import META


def is_sharded(path: str | Path) -> bool:
    """Whether `path` is a sharded (torch.distributed.checkpoint) checkpoint directory."""
    return Path(path).is_dir() and (Path(path) / META).is_file()


def load_meta(path: str | Path) -> dict:
    """The non-tensor part of a checkpoint (global step, loop state, our `llm` dict); a file's
    tensors are memory-mapped, not read."""
    path = Path(path)
    file = path / META if path.is_dir() else path
    return torch.load(file, map_location="cpu", weights_only=True, mmap=not path.is_dir())


def checkpoint_step(path: str | Path) -> int:
    """The optimizer steps the checkpoint had taken."""
    return int(load_meta(path)["global_step"])


@dataclass(frozen=True)
class CheckpointMeta:
    """Our `llm` dict of a checkpoint, typed: which network its weights belong to."""

    stage: str  # pretrain, sft, reward, dpo, ... (the module that saved it)
    model_config: ModelConfig
    value_head: bool  # a reward model / critic (ValueModel) rather than a language model
    lora: Optional[LoRAConfig]  # set when the checkpoint holds LoRA adapters only (base: `parent`)
    parent: Optional[Path]  # the checkpoint a post-training stage started from
    step: int

    @classmethod
    def read(cls, path: str | Path, key: str = "checkpoint") -> CheckpointMeta:
        """ConfigError naming `key` when the checkpoint does not load or was not written by llm-train."""
        try:
            meta = load_meta(path)
        except Exception as e:  # torch raises several kinds on a torn or foreign file
            raise ConfigError([unreadable(key, path, why_unreadable(path, e))]) from e
        llm = meta.get("llm") if isinstance(meta, dict) else None
        if not isinstance(llm, dict) or not isinstance(llm.get("model_config"), dict):
            raise ConfigError([unreadable(key, path, "no model config in it: it was not written by llm-train")])
        lora = llm.get("lora")
        return cls(stage=str(llm.get("stage", "pretrain")), model_config=ModelConfig.from_dict(llm["model_config"]),
                   value_head=bool(llm.get("value_head", False)),
                   lora=LoRAConfig(**lora) if isinstance(lora, dict) and lora.get("enabled") else None,
                   parent=Path(llm["parent"]) if llm.get("parent") else None,
                   step=int(meta.get("global_step", 0)))


def unreadable(key: str, path: str | Path, why: str) -> str:
    """The one-line refusal of a checkpoint that does not load, with the fix."""
    return (f"{key}: {path}: not a readable checkpoint ({why}); give a run directory, a run id, or a checkpoint "
            "written by llm-train")


def why_unreadable(path: str | Path, error: Exception) -> str:
    """What is wrong with a checkpoint that raised `error` on loading, in a few words."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its index at the end
        return NOT_AN_ARCHIVE
    if is_sharded(path):
        from llm.checkpoint.safe_reader import RefusedPickle

        try:
            missing = _missing_shard(path)
        except RefusedPickle as refused:  # the index names a class or function it never holds
            return str(refused)
        except Exception:  # the shards' index itself is absent or torn
            missing = "the index of its shards (.metadata) is missing or torn"
        if missing:
            return missing
    return _first_line(error)


NOT_AN_ARCHIVE = "not a whole checkpoint archive (cut short, or not written by torch.save)"


def checkpoint_problem(path: str | Path) -> Optional[str]:
    """Why the checkpoint at `path` cannot be resumed from, or None when it loads: a file must
    unpickle (safely) with its weights and step; a sharded directory needs its metadata (which
    unpickles to torch's metadata types only) and every shard file it names, at full length."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its index at the end
        return NOT_AN_ARCHIVE
    try:
        meta = load_meta(path)
        if not path.is_dir() and "state_dict" not in meta:
            return "no model weights (state_dict) in it"
        if "global_step" not in meta:
            return "no global_step in it"
        if path.is_dir():
            return _missing_shard(path)
    except Exception as e:  # torch.load raises several kinds on a torn or foreign file
        return f"{type(e).__name__}: {_first_line(e)}"
    return None


def _missing_shard(directory: Path) -> Optional[str]:
    """The first shard file the sharded checkpoint's metadata names that is absent or short (the
    metadata read safely: RefusedPickle when it names anything but torch's metadata types)."""
    from llm.checkpoint.safe_reader import SafeFileSystemReader

    needed: dict[str, int] = {}
    for info in SafeFileSystemReader(str(directory)).read_metadata().storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        have = (directory / name).stat().st_size if (directory / name).is_file() else None
        if have is None or have < size:
            return f"shard {name} is {'missing' if have is None else f'{have} of {size} bytes'}"
    return None


def require_same_model(path: str | Path, model_config: Any) -> None:
    """Refuse (ConfigError) a checkpoint written by a model of another shape than `model_config`;
    fields left None here (derived, e.g. the vocabulary from the tokenizer) are not compared."""
    saved = (load_meta(path).get("llm") or {}).get("model_config")
    if saved is None:
        return
    mine, theirs = flatten(asdict(model_config)), flatten(saved)
    differ = [f"model.{k}={theirs[k]!r} there, {v!r} here" for k, v in mine.items()
              if v is not None and k in theirs and theirs[k] != v]
    if differ:
        raise ConfigError([f"checkpoint {path}: written by a model of another architecture ({'; '.join(differ)}); "
                           "resume with the run's own model settings, or start a new run"])


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    """{"attention": {"n_kv_heads": 2}} -> {"attention.n_kv_heads": 2}."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
