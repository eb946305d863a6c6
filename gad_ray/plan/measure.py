"""Measuring what the plan counts: the peak of live tensor bytes in this process over a region,
for comparing a step's planned peak (:func:`gad_ray.plan.learners.learner_step`) with the real
one (``tests/plan/test_measured.py``, ``bench/gpu_check.py``).

On GPU: ``torch.cuda.max_memory_allocated`` (every tensor and kernel workspace the caching
allocator hands out; not its cache, NCCL's buffers or the CUDA context). On CPU there is no
caching allocator: the live tensor bytes at the start (every tensor Python can reach, each
storage once) plus the largest running sum of the allocations and frees the profiler records
(``torch.profiler`` with ``profile_memory=True``: every block of PyTorch's CPU allocator,
kernel temporaries included).
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every CPU tensor reachable from Python."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.device.type != "cpu":
            continue
        st = obj.untyped_storage()
        if st.data_ptr():
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class TensorPeak:
    """``start()`` ... ``stop()`` -> the peak bytes of live tensors in between (module
    docstring); the two may be separate calls into a Ray actor (same thread)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.prof: profile | None = None
        self.where: list[str] = []  # CPU: the ops running at the peak, innermost first

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.base = live_tensor_bytes()
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.start()

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        assert self.prof is not None, "TensorPeak.stop() before start()"
        self.prof.stop()
        events = self.prof.profiler.kineto_results.events()
        allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        live = peak = 0
        at = None
        for t, nbytes in allocs:
            live += nbytes
            if live > peak:
                peak, at = live, t
        ops = [e for e in events if e.name() != "[memory]" and at is not None]
        ops = [e for e in ops if e.start_ns() <= at <= e.start_ns() + e.duration_ns()]
        self.where = [e.name() for e in sorted(ops, key=lambda e: e.duration_ns())]
        self.prof = None
        return self.base + peak


def start_peak(worker: Any) -> None:
    """Inside a learner rank (``group.run_all("__ray_call__", start_peak)``): start measuring
    its peak of live tensor bytes."""
    worker.tensor_peak = TensorPeak(worker.device)
    worker.tensor_peak.start()


def stop_peak(worker: Any) -> int:
    """Inside a learner rank: the peak since :func:`start_peak`."""
    peak = worker.tensor_peak.stop()
    del worker.tensor_peak
    return peak
