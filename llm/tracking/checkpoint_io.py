"""Moved to llm.checkpoint.save; re-exported until llm/train.py and llm/posttraining.py import it there."""

from llm.checkpoint.save import AtomicCheckpointIO, atomic_torch_save  # noqa: F401
