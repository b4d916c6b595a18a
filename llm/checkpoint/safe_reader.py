"""Reading a sharded checkpoint without running anything its files hold.

A `torch.distributed.checkpoint` directory has two pickled parts that torch reads with plain
`pickle`: the index of its shards (`.metadata`, in `FileSystemReader.read_metadata`) and each
non-tensor entry in the shard files (optimizer hyperparameters; `DefaultLoadPlanner.load_bytes`
reads them with `torch.load(weights_only=False)`). A crafted directory could run any code in
either. Here:

- `SafeFileSystemReader` unpickles `.metadata` with `MetadataUnpickler`, which builds only the
  exact classes torch writes there (`METADATA_GLOBALS`, found by unpickling real FSDP, FSDP+TP
  and single-process checkpoints) and refuses any other global with `RefusedPickle`;
- `SafeLoadPlanner` reads non-tensor entries with `torch.load(weights_only=True)` (plain values
  and tensors only), refusing the rest alike;
- tensors are read by torch itself with `weights_only=True` already.

`safe_load` is `torch.distributed.checkpoint.load` with both; `read_entries` reads a
directory's entries with it in this one process.

Every sharded read goes through these: `checkpoint_problem` (resume), `read_weights` (llm-eval,
llm-generate, init_from, a post-training run's finish), `consolidate` (llm-consolidate), and
Lightning's own resume load under FSDP/TP (`llm.parallel.strategy.SafeModelParallelStrategy`).
`meta.pt`, the rest of a sharded checkpoint, is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

METADATA_FILE = ".metadata"  # torch's name for the index of the shards

_DCP = "torch.distributed.checkpoint.metadata"
_PATHS = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")
# (module, name) of every global torch pickles into `.metadata`; building them runs no code of the
# file's choosing (dataclass constructors, torch.Size, a layout looked up by name, an Enum by value).
METADATA_GLOBALS = frozenset({
    (_DCP, "Metadata"), (_DCP, "TensorStorageMetadata"), (_DCP, "BytesStorageMetadata"),
    (_DCP, "ChunkStorageMetadata"), (_DCP, "TensorProperties"), (_DCP, "_MEM_FORMAT_ENCODING"),
    (_DCP, "MetadataIndex"), (_DCP, "StorageMeta"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id: the path it was saved to (pathlib's module is pathlib._local in Python 3.13)
    *((module, name) for module in ("pathlib", "pathlib._local") for name in _PATHS),
})
# torch.float32, torch.strided, torch.contiguous_format, ...: constants pickled by name.
TORCH_CONSTANTS = frozenset(name for name, value in vars(torch).items()
                            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)))


class RefusedPickle(pickle.UnpicklingError):
    """A checkpoint file names a class or function its format never holds: nothing of it was run."""


class MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that builds only torch's checkpoint metadata types (`METADATA_GLOBALS`)."""

    def __init__(self, file: BinaryIO, name: str):
        super().__init__(file)
        self.name = name  # the file, for the refusal

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS or (module == "torch" and name in TORCH_CONSTANTS):
            return super().find_class(module, name)
        raise RefusedPickle(f"{self.name}: refused to unpickle {module}.{name}, which torch's checkpoint metadata "
                            "never holds (the file was not written by torch.distributed.checkpoint, or was "
                            "tampered with); nothing in it was run")


class SafeFileSystemReader(FileSystemReader):
    """torch's `FileSystemReader` whose `.metadata` is unpickled by `MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")  # torch's per-rank metadata files are __<rank>.metadata
        path = self.fs.concat_path(self.path, METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}")
        with self.fs.create_stream(path, "rb") as f:
            metadata = MetadataUnpickler(f, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise RefusedPickle(f"{path}: holds a {type(metadata).__name__}, not torch's checkpoint metadata")
        # As torch's reader does: a load id for the planners, on metadata from versions without storage_meta.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def plain_entry(fqn: str, value: io.BytesIO) -> io.BytesIO:
    """A non-tensor entry checked to hold plain values and tensors only, re-serialized by us: torch's
    planners then unpickle our own bytes (with weights_only=False), never the file's."""
    try:
        entry = torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        raise RefusedPickle(f"shard entry {fqn}: refused to unpickle {named.group(1) if named else 'it'}, which a "
                            "checkpoint's non-tensor entries never hold (not written by torch.distributed."
                            "checkpoint, or tampered with); nothing in it was run") from e
    checked = io.BytesIO()
    torch.save(entry, checked)
    checked.seek(0)
    return checked


class SafeLoadPlanner(DefaultLoadPlanner):
    """torch's default planner (fills a given state dict) with non-tensor entries read safely."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        super().load_bytes(read_item, plain_entry(read_item.dest_index.fqn, value))


def safe_load(state: dict[str, Any], directory: str | Path, no_dist: bool = False) -> None:
    """`torch.distributed.checkpoint.load(state, ...)` of `directory` through the safe reader and
    planner. torch wraps any error in a CheckpointException, a BaseException that `except
    Exception` misses: the first rank's own error (RefusedPickle, a missing shard, ...) is raised."""
    import torch.distributed.checkpoint as dcp

    reader = SafeFileSystemReader(str(directory))
    if Path(directory, METADATA_FILE).is_file():
        # Refused here as itself: torch would fall back to per-rank indexes and say "metadata is None".
        reader.read_metadata()
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=no_dist)
    except dcp.CheckpointException as wrapped:
        if not wrapped.failures:
            raise
        error, _ = next(iter(wrapped.failures.values()))
        raise error from wrapped


def read_entries(directory: str | Path, include: Callable[[str], bool] = lambda fqn: True
                 ) -> tuple[dict[str, Any], Metadata]:
    """The entries of a sharded checkpoint that `include` accepts, read in this one process (no
    process group) as whole tensors and plain values, keyed flat as torch stores them
    ("state_dict.model.embed.weight", "optimizer_0.param_groups.0.lr"); and its metadata."""
    metadata = SafeFileSystemReader(str(directory)).read_metadata()  # the shapes (read again by safe_load: small)
    # Tensors of the global shapes recorded, filled in place; non-tensor entries set by the planner.
    state = {fqn: torch.empty(meta.size, dtype=meta.properties.dtype) if isinstance(meta, TensorStorageMetadata)
             else None for fqn, meta in metadata.state_dict_metadata.items() if include(fqn)}
    with warnings.catch_warnings():  # one process on purpose: torch warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        safe_load(state, directory, no_dist=True)
    return state, metadata
