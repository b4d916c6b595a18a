"""The run: its directory layout (RunDir, importable from anywhere) and its lifecycle (Run)."""

from llm.run.layout import RunDir

__all__ = ["RunDir"]
