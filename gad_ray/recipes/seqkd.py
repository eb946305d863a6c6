"""SeqKD, the baseline (docs/algorithms.md §2.9): SFT of the student on the teacher's responses,
one stage, no discriminator. Its learning rate is ``warmup.generator_lr`` (the stage is GAD's
warmup without D)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gad_ray.config.schema import Config
from gad_ray.recipes.gad import warmup_lr, warmup_steps
from gad_ray.recipes.stages import Recipe, Stage, StepDriver, StepInput


def recipe(cfg: Config, steps_per_epoch: int, run_dir: Path) -> Recipe:
    steps = warmup_steps(cfg, steps_per_epoch)
    sft = Stage(
        "warmup",
        steps,
        ("rollout", "generator"),
        ("generator",),
        sft_step,
        on_enter=lambda d: d.roles["generator"].set_base_lr(warmup_lr(cfg)),
        eval_label="before_warmup",
    )
    roles = {"rollout": {}, "generator": {"with_reference": False, "total_steps": steps}}
    return Recipe([sft], roles)


def sft_step(d: StepDriver, x: StepInput) -> dict[str, Any]:
    return d.update({"generator": lambda gen: gen.train_sft(x.teacher)})
