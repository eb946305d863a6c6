"""Moving an idle learner's state between the accelerator and host memory.

Small functions over (module | optimizer | tensors, device) that the engines'
``offload``/``onload`` compose. A move to the device a tensor is already on does nothing, so on a
CPU-only machine offloading runs the same code and moves nothing; ``copy=True`` makes every move
a real copy into new storage even then (how the tests exercise the moves without a GPU). A copy
from CUDA to CPU is ``non_blocking``, which lands it in pinned host memory (fast to copy back),
and is waited for at once (host code, e.g. FSDP2 re-padding a shard, may read it next); copies
to CUDA are queued on the current stream: call :func:`synchronize` to wait for them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

CPU = torch.device("cpu")


def to_device(t: torch.Tensor, device: torch.device, copy: bool = False) -> torch.Tensor:
    """``t`` itself when already on ``device`` (and not ``copy``), else a copy there (pinned
    and complete when it comes from CUDA to CPU)."""
    if t.device == device and not copy:
        return t
    out = t.to(device, non_blocking=True, copy=True)
    if t.device.type == "cuda" and device.type == "cpu":
        torch.cuda.current_stream(t.device).synchronize()
    return out


@torch.no_grad()
def move_module(module: nn.Module, device: torch.device, copy: bool = False) -> None:
    """Parameters, their gradients and the buffers of ``module`` onto ``device``, in place.

    ``nn.Module._apply`` keeps the Parameter objects (an optimizer's keys stay valid); for an
    FSDP2 module it swaps each sharded DTensor's contents and ``FSDPModule._apply`` reshards
    first and re-registers the new local shards with FSDP (``reset_sharded_param``).
    """
    module._apply(lambda t: to_device(t, device, copy))


@torch.no_grad()
def move_optimizer_state(
    optimizer: torch.optim.Optimizer, device: torch.device, copy: bool = False
) -> None:
    """Every tensor of ``optimizer.state`` (AdamW's ``exp_avg``, ``exp_avg_sq``) onto
    ``device``; ``step`` stays where the optimizer keeps it (a CPU scalar for torch AdamW)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = to_device(value, device, copy)


@torch.no_grad()
def move_data(tensors: Iterable[torch.Tensor], device: torch.device, copy: bool = False) -> None:
    """Re-point each tensor's ``.data`` to a copy on ``device`` (the tensor objects stay, so
    whoever holds them sees the move)."""
    for t in tensors:
        t.data = to_device(t.data, device, copy)


def synchronize(device: torch.device, free_cache: bool = False) -> None:
    """Wait for the non-blocking copies of a CUDA ``device``; with ``free_cache`` hand its
    cached, now unused blocks back to the driver (``torch.cuda.empty_cache``). No-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if free_cache:
            torch.cuda.empty_cache()
