"""Learner groups: N Ray actors training one model with FSDP2 (or DeepSpeed) over one
``torch.distributed`` group; the generator (student policy) learner lives here."""

from gad_ray.learner.backends import build_engine, build_frozen
from gad_ray.learner.engine import Engine, FSDP2Engine
from gad_ray.learner.generator import GeneratorGroup, GeneratorWorker, policy_logprobs
from gad_ray.learner.group import LearnerError, LearnerGroup
from gad_ray.learner.worker import LearnerWorker

__all__ = [
    "Engine",
    "FSDP2Engine",
    "GeneratorGroup",
    "GeneratorWorker",
    "LearnerError",
    "LearnerGroup",
    "LearnerWorker",
    "build_engine",
    "build_frozen",
    "policy_logprobs",
]
