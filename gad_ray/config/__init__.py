"""Config schema (pydantic) and Hydra composition."""

from gad_ray.config.schema import Config, ConfigError, validate_config

__all__ = ["Config", "ConfigError", "validate_config"]
