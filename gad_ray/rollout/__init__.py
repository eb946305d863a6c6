"""Rollout: vLLM (or HF) generation in Ray actors, and weight sync from the generator learner."""

from .group import RolloutGroup
from .types import Sample, check_request
from .weight_sync import resolve_sync_method, send_weights

__all__ = ["RolloutGroup", "Sample", "check_request", "resolve_sync_method", "send_weights"]
