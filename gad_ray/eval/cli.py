"""``gad-eval``: compose and validate the config (evaluation lands with its issue)."""

from __future__ import annotations

from gad_ray.config import Config
from gad_ray.config.hydra_app import hydra_entry


def evaluate(cfg: Config) -> None:
    """Evaluate the checkpoints named in ``cfg``."""
    print(f"gad-eval: config for {cfg.name!r} is valid; evaluation is not implemented yet.")


main = hydra_entry(evaluate)

if __name__ == "__main__":
    main()
