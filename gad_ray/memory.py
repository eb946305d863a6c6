"""Memory of this process, for the per-phase, per-role peaks the driver logs
(``mem/<role>/<phase>_peak_gb``)."""

from __future__ import annotations

import re
import resource
import sys

import torch

_GB = 1e9


def _proc_status_gb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) * 1024 / _GB if m else None


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to ``/proc/self/clear_refs`` resets the peak RSS (VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_stats(device: torch.device, reset: bool = False) -> dict[str, float]:
    """``{"peak_gb", "current_gb"}`` of this process, in GB (1e9 bytes), peak since the last
    ``reset`` (read before resetting).

    CUDA: ``torch.cuda.max_memory_allocated`` / ``memory_allocated`` (tensors only: not the
    allocator's cache, NCCL or the CUDA context); ``reset`` calls ``reset_peak_memory_stats``.
    CPU: the resident set size (``VmRSS``) and its peak (``VmHWM``), reset through
    ``/proc/self/clear_refs``; where that is unavailable (not Linux) the peak is
    ``ru_maxrss``, the peak since the process started, and ``reset`` does nothing.
    """
    if device.type == "cuda":
        out = {
            "peak_gb": torch.cuda.max_memory_allocated(device) / _GB,
            "current_gb": torch.cuda.memory_allocated(device) / _GB,
        }
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return out
    current = _proc_status_gb("VmRSS")
    peak = _proc_status_gb("VmHWM")
    if current is None or peak is None:  # no /proc: ru_maxrss is in bytes on macOS, else kB
        unit = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / _GB
        current = peak if current is None else current
    if reset:
        _reset_rss_peak()
    return {"peak_gb": max(peak, current), "current_gb": current}
