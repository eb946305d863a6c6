"""The paper's off-policy ablation (docs/algorithms.md §2.9): GAD with D trained in warmup, then
frozen for the GAD stage, so the student can learn to exploit a fixed reward (watch
``len_ratio``). D's scores and BT metrics are still logged; its checkpoint stays as warmup
left it."""

from __future__ import annotations

from pathlib import Path

from gad_ray.config.schema import Config
from gad_ray.recipes import gad
from gad_ray.recipes.stages import Recipe

check = gad.check


def recipe(cfg: Config, steps_per_epoch: int, run_dir: Path) -> Recipe:
    return gad.recipe(cfg, steps_per_epoch, run_dir, train_d_in_gad=False)
