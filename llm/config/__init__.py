"""Config schemas (registered in Hydra's ConfigStore) and the one validation pass."""

from llm.config.methods import METHODS
from llm.config.schema import SCHEMAS
from llm.config.validate import ConfigError, checked, method_config, method_schema, typed, validate

__all__ = ["METHODS", "SCHEMAS", "ConfigError", "checked", "method_config", "method_schema", "typed", "validate"]
