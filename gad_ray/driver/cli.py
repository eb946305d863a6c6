"""``gad-train``: compose and validate the config, then run the driver (docs/algorithms.md §2.6).

``plan_only=true`` prints the per-GPU memory plan (:mod:`gad_ray.plan`) and exits instead:
0 when it fits, 2 (naming the knobs to change) when it does not. A mistake in the input stops
the run before any actor starts, printing the message alone (exit 2).
"""

from __future__ import annotations

import sys

from gad_ray.driver.driver import TrainingAborted, train
from gad_ray.hydra_app import hydra_entry


def _train(cfg) -> None:
    if cfg.plan_only:
        from gad_ray.plan.report import run_plan

        sys.exit(run_plan(cfg))
    try:
        train(cfg)
    except TrainingAborted as err:  # the cause and the checkpoint to resume from
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


main = hydra_entry(_train, help="train")

if __name__ == "__main__":
    main()
