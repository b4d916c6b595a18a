"""Interoperability with other libraries' model formats (today: Hugging Face transformers)."""

from llm.interop.hf import export_checkpoint, export_hf, import_hf

__all__ = ["export_checkpoint", "export_hf", "import_hf"]
