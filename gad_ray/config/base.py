"""The config's errors and the base of every section: unknown keys are errors."""

from pydantic import BaseModel, ConfigDict


class InputError(Exception):
    """A mistake in what the user gave (config, paths, data, model, key): the CLIs print the
    message alone, without a traceback (``HYDRA_FULL_ERROR=1`` shows it)."""


class ConfigError(InputError, ValueError):
    """A config that cannot run; the message names the key(s) and value(s)."""


class Strict(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
