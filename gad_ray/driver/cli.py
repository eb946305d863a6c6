"""``gad-train``: compose and validate the config, then run the driver."""

from __future__ import annotations

from gad_ray.config import Config
from gad_ray.config.hydra_app import hydra_entry


def train(cfg: Config) -> None:
    """Run one training job described by ``cfg``."""
    print(f"gad-train: config for {cfg.name!r} is valid (algorithm={cfg.algorithm.name}).")
    print("The trainer is not implemented yet; see README.md.")


main = hydra_entry(train)

if __name__ == "__main__":
    main()
