"""The ``model`` section: the student, the discriminator and their LoRA adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gad_ray.config.base import Strict


class LoraSpec(Strict):
    """LoRA adapters (``peft``) on the model's linear layers; ``rank: 0`` trains every weight.

    With LoRA the base weights are frozen and held in the compute dtype; only the adapters (and
    D's scalar head) are trained, as fp32 masters with their AdamW state (docs/lora.md)."""

    rank: int = Field(0, ge=0)  # 0: off (full fine-tuning)
    alpha: float = Field(16.0, gt=0)  # the update is (alpha / rank) * B A
    dropout: float = Field(0.0, ge=0, lt=1)
    # peft's target_modules: a list of module names, or "all-linear" (every linear layer of the
    # decoder, not the LM head)
    target_modules: list[str] | str = "all-linear"
    # HF export (final/): "merged" writes a plain HF model (W + (alpha/rank) B A, vLLM loads it),
    # "adapter" writes peft's adapter directory + a pointer to the base
    export: Literal["merged", "adapter"] = "merged"

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class ModelSpec(Strict):
    """One causal LM: a local directory, a hub name, or ``tiny:<size>[-<arch>]`` (built locally)."""

    path: str
    tokenizer: str | None = None  # defaults to ``path``
    # The COMPUTE dtype (forward/backward, rollout weights, HF export); trained weights and
    # optimizer state are always fp32 masters. auto: bf16 on GPU, fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    max_context: int | None = Field(None, gt=0)  # overrides the model's max_position_embeddings
    lora: LoraSpec = LoraSpec()


class DiscriminatorSpec(ModelSpec):
    """The discriminator backbone; ``path: student`` initialises it from the student checkpoint."""

    path: str = "student"


class ModelConfig(Strict):
    student: ModelSpec
    discriminator: DiscriminatorSpec = DiscriminatorSpec()
