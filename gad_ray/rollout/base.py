"""The interface every rollout backend implements, and the registry ``rollout.backend`` names.

A backend is a class run as a Ray actor (one engine with its own copy of the student). The
rollout group calls only these methods; weight sync (:mod:`gad_ray.rollout.weight_sync`) calls
the ``*weight*`` and ``receive_*`` ones. A new backend subclasses :class:`RolloutBackend` and
adds its ``module:Class`` to :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from gad_ray.rollout.types import Sample, SamplingParams

# rollout.backend -> "module:Class" (imported when used: vLLM only where it is installed)
BACKENDS = {
    "vllm": "gad_ray.rollout.vllm_worker:RolloutWorker",
    "hf": "gad_ray.rollout.hf_worker:HFRolloutWorker",
}


def backend_class(name: str) -> type[RolloutBackend]:
    """The worker class of ``rollout.backend=name``."""
    if name not in BACKENDS:
        raise ValueError(f"rollout.backend={name!r}: expected one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


class RolloutBackend(ABC):
    """One generation engine. Constructed as ``(model_path, RolloutConfig, dtype,
    max_model_len, seed, lora_rank)``; with ``lora_rank > 0`` it serves the base model plus the
    LoRA adapter each weight update sends."""

    @abstractmethod
    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        seed: int | None = None,
        prompt_indices: list[int] | None = None,
    ) -> list[Sample]:
        """``params.n`` samples per prompt, prompt-major, seeded per sample (``sample_seed``),
        with the log-probs of the distribution sampled from."""

    @abstractmethod
    def weight_group_size(self) -> int:
        """Ranks this worker adds to a broadcast group (its tensor-parallel processes)."""

    @abstractmethod
    def init_weight_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str
    ) -> None: ...

    @abstractmethod
    def begin_weight_update(self, adapter: dict | None = None) -> None:
        """Start an update: full weights, or (``adapter``: its peft config) a LoRA adapter."""

    @abstractmethod
    def receive_bucket(self, metas: list, flat: np.ndarray) -> None:
        """Load one bucket from the object store."""

    @abstractmethod
    def receive_broadcast(self, metas: list) -> None:
        """Load one bucket broadcast over the weight group (NCCL / gloo)."""

    @abstractmethod
    def receive_ipc(self, metas: list, handle: Any) -> None:
        """Load one bucket shared through a CUDA IPC / shared-memory handle."""

    @abstractmethod
    def finish_weight_update(self) -> None:
        """Finish loading and drop every cached prefix of the old weights."""

    @abstractmethod
    def sleep(self, level: int = 1) -> dict: ...

    @abstractmethod
    def wake_up(self, tags: list[str] | None = None) -> dict: ...

    @abstractmethod
    def memory_stats(self, reset: bool = False) -> dict[str, float]: ...

    @abstractmethod
    def health(self) -> dict: ...
