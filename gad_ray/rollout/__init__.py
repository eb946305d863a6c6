"""Rollout: vLLM (or HF) generation in Ray actors, and weight sync from the generator learner."""

from .base import BACKENDS, RolloutBackend, backend_class
from .group import RolloutGroup, RolloutWorkersLost
from .types import Sample, SamplingParams, check_request
from .weight_sync import resolve_sync_method, send_weights

__all__ = [
    "BACKENDS",
    "RolloutBackend",
    "RolloutGroup",
    "RolloutWorkersLost",
    "Sample",
    "SamplingParams",
    "backend_class",
    "check_request",
    "resolve_sync_method",
    "send_weights",
]
