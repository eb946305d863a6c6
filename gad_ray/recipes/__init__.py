"""The algorithms: one module each (``gad_ray/recipes/<algorithm.name>.py``) plus its config file
(``gad_ray/conf/algorithm/<name>.yaml``). Nothing else names them: the driver runs whatever stages a
recipe returns and never branches on an algorithm's name.

A recipe module defines

- ``recipe(cfg, steps_per_epoch, run_dir) -> Recipe``: its stages (:class:`~gad_ray.driver.stages.
  Stage`) and the options of the roles they use (e.g. ``{"generator": {"with_reference": True}}``);
  cheap and pure, so the config check and the memory plan can call it before any data loads;
- optionally ``check(cfg) -> Iterator[str]``: problems of a config for this algorithm (each a
  message naming the key and value), reported with the schema's own.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gad_ray.config.schema import Config
    from gad_ray.driver.stages import Stage


@dataclass
class Recipe:
    """An algorithm's stages, in order, and the factory options of each role they use."""

    stages: list[Stage]
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)

    def role_sets(self) -> list[tuple[str, ...]]:
        """The roles alive at once: one set per stage that runs."""
        return [s.roles for s in self.stages if s.steps > 0]


def names() -> list[str]:
    """Every algorithm: the modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]))


def module(name: str) -> ModuleType:
    """The recipe module of ``algorithm.name``; a name without one is a clear error."""
    if name not in names():
        raise ValueError(
            f"algorithm.name={name!r}: no such algorithm; expected one of {names()} "
            f"(modules of gad_ray/recipes/)"
        )
    return importlib.import_module(f"{__name__}.{name}")


NOMINAL_EPOCH = 1000  # steps per epoch when only the recipe's structure is wanted


def build(cfg: Config, steps_per_epoch: int = NOMINAL_EPOCH, run_dir: Path | str = ".") -> Recipe:
    """``cfg.algorithm.name``'s recipe for data of ``steps_per_epoch`` batches (without data:
    a nominal epoch, for the stages' roles and sampling)."""
    return module(cfg.algorithm.name).recipe(cfg, steps_per_epoch, Path(run_dir))


def check(cfg: Config) -> Iterator[str]:
    """The algorithm's own config problems (none for a recipe without ``check``)."""
    yield from getattr(module(cfg.algorithm.name), "check", lambda cfg: iter(()))(cfg)
