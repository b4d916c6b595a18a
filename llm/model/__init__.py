"""The model: plain PyTorch, no parallelism, no Lightning."""

from llm.model.config import AttentionConfig, ModelConfig, MoEConfig, PositionConfig
from llm.model.transformer import Transformer

__all__ = ["AttentionConfig", "ModelConfig", "MoEConfig", "PositionConfig", "Transformer"]
