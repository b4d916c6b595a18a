"""How a plain model is spread over devices. Applied from outside: the model knows nothing of it."""

from llm.parallel.apply import DDP, FSDP, Single

__all__ = ["DDP", "FSDP", "Single"]
