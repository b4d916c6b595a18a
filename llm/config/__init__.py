"""Config schemas (registered in Hydra's ConfigStore) and the one validation pass."""

from llm.config.schema import SCHEMAS
from llm.config.validate import ConfigError, typed, validate

__all__ = ["SCHEMAS", "ConfigError", "typed", "validate"]
