"""The files of LoRA adapters: peft's adapter directory (what vLLM's LoRA loader and
``peft.PeftModel.from_pretrained`` read) and the pointer from a LoRA checkpoint to its base.
Building and training adapters is :mod:`gad_ray.learner.lora`'s; the rollout workers only
write what they receive."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from gad_ray.config.schema import LoraSpec

BASE_POINTER = "lora_base.json"  # in a LoRA checkpoint / adapter export: which base it needs


def save_adapter(path: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write peft's adapter directory: ``adapter_model.safetensors`` + ``adapter_config.json``."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{path}/adapter_model.safetensors")
    with open(f"{path}/adapter_config.json", "w") as f:
        json.dump(config, f, indent=2)


def write_base_pointer(path: str, base: str, specs: dict[str, LoraSpec]) -> None:
    """Record in ``path`` the base model the adapters there apply to, and their specs."""
    os.makedirs(path, exist_ok=True)
    pointer = {"base": base, "adapters": {k: s.model_dump() for k, s in specs.items()}}
    with open(os.path.join(path, BASE_POINTER), "w") as f:
        json.dump(pointer, f, indent=2)


def check_base_pointer(path: str, base: str) -> None:
    """Raise when the checkpoint in ``path`` holds adapters of another base than ``base``."""
    file = os.path.join(path, BASE_POINTER)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} is not a LoRA checkpoint: {file!r} is missing")
    with open(file) as f:
        saved = json.load(f)["base"]
    if saved != base:
        raise ValueError(
            f"the LoRA checkpoint {path!r} holds adapters of the base {saved!r}, not {base!r}"
        )
