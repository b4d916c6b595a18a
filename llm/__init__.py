"""llm: declarative LLM experiments. Hydra composes, Lightning trains, W&B records."""

__version__ = "0.1.0"
