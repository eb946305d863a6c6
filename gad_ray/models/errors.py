"""The error of a model spec, low enough for every model builder (tiny, synthetic) to raise."""

from gad_ray.config.schema import InputError


class ModelLoadError(InputError, ValueError):
    """A model spec that cannot be resolved or loaded."""
