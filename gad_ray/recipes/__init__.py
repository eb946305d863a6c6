"""The algorithms: one module each (``gad_ray/recipes/<algorithm.name>.py``) plus its config file
(``gad_ray/conf/algorithm/<name>.yaml``). Nothing else names them: the driver runs whatever stages a
recipe returns and never branches on an algorithm's name.

A recipe module defines

- ``recipe(cfg, steps_per_epoch, run_dir) -> Recipe``: its stages (:class:`~gad_ray.recipes.stages.
  Stage`) and the options of the roles they use (e.g. ``{"generator": {"with_reference": True}}``);
  cheap and pure, so the config check and the memory plan can call it before any data loads;
- optionally ``check(cfg) -> Iterator[str]``: problems of a config for this algorithm (each a
  message naming the key and value), reported with the schema's own.
"""

from gad_ray.recipes.registry import NOMINAL_EPOCH, build, check, module, names
from gad_ray.recipes.stages import Recipe

__all__ = ["NOMINAL_EPOCH", "Recipe", "build", "check", "module", "names"]
