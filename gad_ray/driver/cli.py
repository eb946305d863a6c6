"""``gad-train``: compose and validate the config, then run the driver (docs/algorithms.md §2.6)."""

from __future__ import annotations

import sys

from gad_ray.config.hydra_app import hydra_entry
from gad_ray.driver.train import TrainingAborted, train


def _train(cfg) -> None:
    try:
        train(cfg)
    except TrainingAborted as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


main = hydra_entry(_train)

if __name__ == "__main__":
    main()
