"""Loading once: global rank 0 reads the weights, every other rank starts empty and receives them.

A learner's ``setup`` builds its model on rank 0 from the weight files (:func:`reads_weights`)
and, on the other ranks, the same architecture on the meta device (no memory, no file read:
``load_causal_lm(..., empty=True)``). The engines then fill every rank's shards from rank 0,
one tensor at a time (docs/placement.md, "Learner backends: loading and partitioning"): FSDP2
through ``set_model_state_dict(..., broadcast_from_rank0=True)`` (:func:`load_shards`),
DeepSpeed ZeRO-3 through its own partitioning, which broadcasts each parameter from rank 0 before
it keeps its partition, and replicated modules (ZeRO-2) through :func:`broadcast_module`. Host
memory per node: one full copy on rank 0's, ~0 on the others'. The engines always broadcast, so
a model that every rank loaded in full ends up with rank 0's values too.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict


def reads_weights() -> bool:
    """Whether this rank reads the weight files (global rank 0); the others build empty models."""
    return dist.get_rank() == 0


def empty_tensors(empty: bool) -> AbstractContextManager:
    """With ``empty``, build on the meta device (what is added to an empty model, e.g. LoRA
    adapters, is filled from rank 0 too)."""
    return torch.device("meta") if empty else nullcontext()


def place(p: nn.Parameter, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Put ``p`` on ``device`` (floating point ones in ``dtype``), keeping the Parameter object
    (modules that share it, tied embeddings, keep sharing it): rank 0's weights are moved, a
    meta parameter gets uninitialised memory there (for a broadcast to fill)."""
    dtype = dtype if dtype is not None and p.is_floating_point() else p.dtype
    if p.is_meta:
        empty = torch.empty(p.shape, dtype=dtype, device=device)
        torch.utils.swap_tensors(p, nn.Parameter(empty, requires_grad=p.requires_grad))
    else:
        p.data = p.data.to(device, dtype)


def broadcast_buffers(model: nn.Module, device: torch.device) -> None:
    """Every buffer of ``model`` onto ``device`` with rank 0's values (meta on the other ranks:
    the non-persistent ones, e.g. rotary frequencies, are in no state dict)."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is None:
                continue
            out = torch.empty_like(buf, device=device) if buf.is_meta else buf.to(device)
            dist.broadcast(out, 0)
            module._buffers[name] = out


def broadcast_module(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A replicated ``model`` on ``device``, floating point parameters in ``dtype``, with rank 0's
    values; parameter by parameter, so no rank holds a second copy."""
    for p in model.parameters():  # tied parameters once
        place(p, device, dtype)
        dist.broadcast(p.data, 0)
    broadcast_buffers(model, device)
    return model


def load_shards(
    model: nn.Module, full: dict[str, torch.Tensor], device: torch.device, shards_on: torch.device
) -> None:
    """Fill the FSDP2 shards of ``model`` (already ``fully_shard``-ed; meta on ranks other than
    0) from rank 0's ``full`` state dict (empty elsewhere), one tensor at a time through
    ``device``; the shards live on ``shards_on`` (CPU when offloaded), the buffers on ``device``."""
    with torch.no_grad():  # meta shards get memory first, so no assignment breaks a tied weight
        model._apply(lambda t: torch.empty_like(t, device=shards_on) if t.is_meta else t)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    broadcast_buffers(model, device)
