"""Config schema (pydantic) and Hydra composition; the whole check is :mod:`gad_ray.validate`."""

from gad_ray.config.schema import Config, ConfigError, parse_config

__all__ = ["Config", "ConfigError", "parse_config"]
