"""A sharded FSDP/TP checkpoint gathered into one ordinary checkpoint file (`llm-consolidate`).

torch's public `torch.distributed.checkpoint.format_utils.dcp_to_torch_save` reads every shard in
this one process into whole tensors; the result keeps Lightning's layout, so every loader and a
resume read it like a single-process checkpoint: `state_dict` (with `model.` prefixes),
`optimizer_states` (a list, one per optimizer) and the non-tensor part from meta.pt (global
step, loop state, our `llm` dict).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch

from llm.checkpoint.meta import is_sharded, load_meta
from llm.checkpoint.save import atomic_torch_save
from llm.config import ConfigError
from llm.run.layout import META


def consolidate(checkpoint_dir: str | Path, out_file: str | Path) -> Path:
    """Write the sharded checkpoint `checkpoint_dir` as the single file `out_file` (atomically)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    if not is_sharded(checkpoint_dir):
        raise ConfigError([f"checkpoint={str(checkpoint_dir)!r}: not a sharded checkpoint directory (no {META} in it); "
                           "give e.g. runs/<id>/checkpoints/last.ckpt of an FSDP/TP run"])
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, gathered = tempfile.mkstemp(dir=out_file.parent, prefix=f".{out_file.name}.gathered-")
    os.close(fd)
    try:
        with warnings.catch_warnings():  # one process on purpose: torch warns that it assumes so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_to_torch_save(checkpoint_dir, gathered)  # {"state_dict": ..., "optimizer_0": ...}, whole tensors
        checkpoint = torch.load(gathered, map_location="cpu", weights_only=True, mmap=True)
        # Lightning saves optimizer states one key per optimizer (`optimizer_0`, ...); a file holds a list.
        names = sorted((k for k in checkpoint if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
        checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in names]
        checkpoint.update(load_meta(checkpoint_dir))
        atomic_torch_save(checkpoint, out_file)
    finally:
        os.unlink(gathered)
    return out_file
