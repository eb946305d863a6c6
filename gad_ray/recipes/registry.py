"""Finding the algorithms: the modules of ``gad_ray/recipes/`` other than this one and
:mod:`gad_ray.recipes.stages`, each named by its ``algorithm.name`` (see the package's docstring)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gad_ray.config.schema import Config
    from gad_ray.recipes.stages import Recipe

PACKAGE = "gad_ray.recipes"
NOT_ALGORITHMS = frozenset({"registry", "stages"})  # the package's own machinery


def names() -> list[str]:
    """Every algorithm: the modules of this package."""
    found = pkgutil.iter_modules([str(Path(__file__).parent)])
    return sorted(m.name for m in found if m.name not in NOT_ALGORITHMS)


def module(name: str) -> ModuleType:
    """The recipe module of ``algorithm.name``; a name without one is a clear error."""
    if name not in names():
        raise ValueError(
            f"algorithm.name={name!r}: no such algorithm; expected one of {names()} "
            f"(modules of gad_ray/recipes/)"
        )
    return importlib.import_module(f"{PACKAGE}.{name}")


NOMINAL_EPOCH = 1000  # steps per epoch when only the recipe's structure is wanted


def build(cfg: Config, steps_per_epoch: int = NOMINAL_EPOCH, run_dir: Path | str = ".") -> Recipe:
    """``cfg.algorithm.name``'s recipe for data of ``steps_per_epoch`` batches (without data:
    a nominal epoch, for the stages' roles and sampling)."""
    return module(cfg.algorithm.name).recipe(cfg, steps_per_epoch, Path(run_dir))


def check(cfg: Config) -> Iterator[str]:
    """The algorithm's own config problems (none for a recipe without ``check``)."""
    yield from getattr(module(cfg.algorithm.name), "check", lambda cfg: iter(()))(cfg)
