"""Sharded training checkpoints (``torch.distributed.checkpoint``) and Hugging Face export.

Layout of a checkpoint directory written by :func:`save_sharded` + :func:`save_rank_state`:
``dcp/`` (model, optimizer and frozen models, sharded), ``scheduler.pt`` and ``rng_<rank>.pt``.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import cached_file

from gad_ray.models.loading import resolve_model_path


def _state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    frozen: dict[str, nn.Module],
    keep: Callable[[str], bool] | None,
) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if keep is not None:  # LoRA: the adapters (and D's head), not the frozen base
        model_sd = {k: v for k, v in model_sd.items() if keep(k)}
    state = {"model": model_sd, "optim": optim_sd}
    for key, m in frozen.items():
        state[f"frozen.{key}"] = get_model_state_dict(m)
    return state


def save_sharded(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    frozen: dict[str, nn.Module],
    keep: Callable[[str], bool] | None = None,
) -> None:
    """Collective: each rank writes its shards of model/optimizer/frozen models; rank 0 the
    scheduler. ``keep``: the model parameters to save, by name (default all)."""
    os.makedirs(path, exist_ok=True)
    dcp.save(_state(model, optimizer, frozen, keep), checkpoint_id=os.path.join(path, "dcp"))
    if dist.get_rank() == 0:
        torch.save(scheduler.state_dict(), os.path.join(path, "scheduler.pt"))
    dist.barrier()


def load_sharded(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    frozen: dict[str, nn.Module],
    keep: Callable[[str], bool] | None = None,
) -> None:
    """Collective inverse of :func:`save_sharded` (resharded to the current world size); with
    ``keep`` the other model parameters keep their values."""
    sched_file = os.path.join(path, "scheduler.pt")
    if not os.path.isfile(sched_file):
        raise FileNotFoundError(f"{path!r} is not a learner checkpoint: {sched_file!r} is missing")
    state = _state(model, optimizer, frozen, keep)
    dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=keep is None),
    )
    for key, m in frozen.items():
        set_model_state_dict(m, state[f"frozen.{key}"])
    scheduler.load_state_dict(torch.load(sched_file, weights_only=False))


def save_rank_state(path: str, rank: int, extra: dict[str, Any]) -> None:
    """This rank's RNG states and ``extra`` (e.g. the step counter) to ``rng_<rank>.pt``."""
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "extra": extra,
    }
    torch.save(state, os.path.join(path, f"rng_{rank}.pt"))


def load_rank_state(path: str, rank: int) -> dict[str, Any]:
    """Restore this rank's RNG states; return the ``extra`` dict it saved."""
    file = os.path.join(path, f"rng_{rank}.pt")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"checkpoint {path!r} has no state for rank {rank} ({file!r} is missing): it was "
            "saved with fewer ranks"
        )
    state = torch.load(file, weights_only=False)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return state["extra"]


def export_hf(
    path: str,
    state_dict: dict[str, torch.Tensor],
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    model_cls: type = AutoModelForCausalLM,
    base: str | None = None,
) -> None:
    """``save_pretrained`` a model of ``config`` holding ``state_dict`` (no second full copy:
    the tensors are assigned, not copied) plus the tokenizer; the generation config is the
    ``base`` model's (:func:`copy_generation_config`). Call on one rank."""
    with torch.device("meta"):
        model = model_cls.from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if base is not None:
        copy_generation_config(base, path)


def copy_generation_config(base: str, path: str) -> None:
    """Put the ``base`` model's own ``generation_config.json`` (its sampling defaults and EOS
    ids; a local directory or the HF cache) in place of the one ``save_pretrained`` derived
    from the model config. Nothing when ``path`` has none (not a generative model) or the
    base has none."""
    out = os.path.join(path, "generation_config.json")
    if not os.path.isfile(out):
        return
    src = cached_file(
        resolve_model_path(base),
        "generation_config.json",
        _raise_exceptions_for_missing_entries=False,
    )
    if src is not None:
        shutil.copyfile(src, out)
