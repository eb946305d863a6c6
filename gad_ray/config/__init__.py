"""The config schema (pydantic); composition is :mod:`gad_ray.hydra_app`, the whole check :mod:`gad_ray.validate`."""

from gad_ray.config.schema import Config, ConfigError, parse_config

__all__ = ["Config", "ConfigError", "parse_config"]
