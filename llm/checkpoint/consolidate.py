"""A sharded FSDP/TP checkpoint gathered into one ordinary checkpoint file (`llm-consolidate`).

Every shard is read in this one process into whole tensors and nested back as it was saved, as
torch's own `dcp_to_torch_save` does, but through `llm.checkpoint.safe_reader`: the shards'
index and non-tensor entries are never unpickled beyond torch's metadata types and plain
values. The result keeps Lightning's layout, so every loader and a resume read it like a
single-process checkpoint: `state_dict` (with `model.` prefixes), `optimizer_states` (a list,
one per optimizer) and the non-tensor part from meta.pt (global step, loop state, our `llm`
dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm.checkpoint.meta import is_sharded, load_meta, unreadable, why_unreadable
from llm.checkpoint.save import atomic_torch_save
from llm.config import ConfigError
from llm.run.layout import META


def consolidate(checkpoint_dir: str | Path, out_file: str | Path) -> Path:
    """Write the sharded checkpoint `checkpoint_dir` as the single file `out_file` (atomically)."""
    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    if not is_sharded(checkpoint_dir):
        raise ConfigError([f"checkpoint={str(checkpoint_dir)!r}: not a sharded checkpoint directory (no {META} in it); "
                           "give e.g. runs/<id>/checkpoints/last.ckpt of an FSDP/TP run"])
    try:
        checkpoint = gather(checkpoint_dir)  # {"state_dict": ..., "optimizer_0": ...}, whole tensors
    except Exception as e:  # torch raises several kinds on torn shards; RefusedPickle on a crafted index
        raise ConfigError([unreadable("checkpoint", checkpoint_dir, why_unreadable(checkpoint_dir, e))]) from e
    # Lightning saves optimizer states one key per optimizer (`optimizer_0`, ...); a file holds a list.
    names = sorted((k for k in checkpoint if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in names]
    checkpoint.update(load_meta(checkpoint_dir))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(checkpoint, out_file)
    return out_file


def gather(checkpoint_dir: Path) -> dict[str, Any]:
    """Every entry of the shards as whole tensors and plain values, nested as it was saved."""
    from llm.checkpoint.safe_reader import read_entries

    entries, metadata = read_entries(checkpoint_dir)
    nested: dict[str, Any] = {}
    for fqn, value in entries.items():  # planner_data: the key path torch flattened each entry from
        set_path(nested, (metadata.planner_data or {}).get(fqn, (fqn,)), value)
    return nested


def set_path(root: dict, path: tuple, value: Any) -> None:
    """root[path[0]][path[1]]... = value, making the dicts (str keys) and lists (int keys) on the way."""
    node: Any = root
    for key, following in zip(path, path[1:]):
        node = _slot(node, key, [] if isinstance(following, int) else {})
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


def _slot(node: Any, key: Any, empty: Any) -> Any:
    if isinstance(node, dict):
        return node.setdefault(key, empty)
    node.extend([None] * (key + 1 - len(node)))  # list entries may come in any order
    if node[key] is None:
        node[key] = empty
    return node[key]
