"""The whole gad-ray config as one pydantic schema, validated before any actor starts.

The Hydra tree in ``gad_ray/conf/`` mirrors these classes: every group (``model``, ``algorithm``,
``rollout``, ``learner``, ``teacher``, ``cluster``) fills one field of :class:`Config`.
Unknown keys and wrong types raise :class:`ConfigError`, whose message names each offending
key and value; the sections live in modules by topic (``model``, ``algorithm``, ``training``,
``teacher``, ``run``) and are re-exported here. Checks that need the recipes or the models
(combinations, the student's context) are :mod:`gad_ray.validate`'s.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from gad_ray.config.algorithm import (
    AlgorithmConfig,
    GADStageConfig,
    GRPOConfig,
    OPDConfig,
    OptimConfig,
    ProxyKDConfig,
    WarmupConfig,
)
from gad_ray.config.base import ConfigError, InputError, Strict
from gad_ray.config.model import DiscriminatorSpec, LoraSpec, ModelConfig, ModelSpec
from gad_ray.config.run import (
    ClusterConfig,
    EvalConfig,
    EvalModelSpec,
    EvalSetSpec,
    GuardsConfig,
    JudgeConfig,
    TrainerConfig,
    WandbConfig,
)
from gad_ray.config.teacher import (
    FetchConfig,
    HeaderFromEnv,
    TeacherAPIConfig,
    TeacherBudget,
    TeacherConfig,
)
from gad_ray.config.training import DataConfig, LearnerConfig, RolloutConfig

__all__ = [
    "AlgorithmConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DiscriminatorSpec",
    "EvalConfig",
    "EvalModelSpec",
    "EvalSetSpec",
    "FetchConfig",
    "GADStageConfig",
    "GRPOConfig",
    "GuardsConfig",
    "OPDConfig",
    "HeaderFromEnv",
    "InputError",
    "JudgeConfig",
    "LearnerConfig",
    "LoraSpec",
    "ModelConfig",
    "ModelSpec",
    "OptimConfig",
    "ProxyKDConfig",
    "RolloutConfig",
    "Strict",
    "TeacherAPIConfig",
    "TeacherBudget",
    "TeacherConfig",
    "TrainerConfig",
    "WandbConfig",
    "WarmupConfig",
    "parse_config",
]


class Config(Strict):
    """The composed, validated configuration of one run."""

    name: str = "run"
    seed: int = 0
    plan_only: bool = False  # gad-train: print the per-GPU memory plan and exit (gad_ray/plan/)
    model: ModelConfig
    algorithm: AlgorithmConfig
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    teacher: TeacherConfig = TeacherConfig()
    fetch: FetchConfig = FetchConfig()
    cluster: ClusterConfig = ClusterConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}' (value: {e['input']!r})")
        elif e["type"] == "secret":  # never echo the value
            lines.append(f"config key '{key}': {e['msg']}")
        elif e["type"] == "value_error" and not key:
            lines.append(str(e["ctx"]["error"]) if "ctx" in e else e["msg"])
        else:
            lines.append(f"config key '{key}': {e['msg']} (value: {e['input']!r})")
    return "invalid config:\n  - " + "\n  - ".join(lines)


def parse_config(raw: dict[str, Any]) -> Config:
    """The schema's own checks of a composed config (a plain dict): keys, types, ranges, each
    section alone; raise :class:`ConfigError` naming keys and values. The checks that need the
    recipes or the models (combinations, the student's context) are
    :func:`gad_ray.validate.validate_config`'s."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
