"""Hydra composition of the config tree (``gad_ray/conf/``, shipped inside the package, so an
installed wheel finds it) and the validated entry point shared by the console scripts."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from gad_ray.config.schema import Config, InputError
from gad_ray.validate import validate_config

CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # gad_ray/conf


def to_config(cfg: DictConfig, check_model_context: bool = True) -> Config:
    """Resolve a composed Hydra config (dropping the ``hydra`` node) and validate it."""
    raw: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    raw.pop("hydra", None)
    return validate_config(raw, check_model_context=check_model_context)


def compose(overrides: list[str] | None = None, run_dir: str | None = None) -> Config:
    """Compose ``conf/config.yaml`` with overrides outside a Hydra app (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides or [])
    if run_dir is not None or not any(o.startswith("trainer.run_dir=") for o in overrides):
        overrides.append(f"trainer.run_dir={run_dir or 'outputs/compose'}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return to_config(cfg)


def hydra_entry(fn: Callable[[Config], Any], help: str) -> Callable[[], None]:
    """Wrap ``fn(config)`` as a Hydra app: compose, validate, run. A mistake in the input (an
    :class:`InputError`: config, path, data, model, key) prints its message alone and exits 2;
    ``HYDRA_FULL_ERROR=1`` shows the traceback instead. ``--help`` prints the app's page,
    ``gad_ray/conf/hydra/help/<help>.yaml`` (what it does, its main keys, examples)."""

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
    @functools.wraps(fn)
    def _app(cfg: DictConfig) -> None:
        try:
            fn(to_config(cfg))
        except InputError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def main() -> None:
        if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
            sys.argv.append(f"hydra/help={help}")
        _app()

    return main
