"""The ``data``, ``rollout`` and ``learner`` sections."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator

from gad_ray.config.base import Strict


class DataConfig(Strict):
    """Prompt (+ teacher response) datasets and their tokenization."""

    train_path: str
    eval_path: str | None = None
    format: Literal["auto", "jsonl", "parquet", "hf_disk", "hub"] = "auto"
    split: str = "train"
    # None: each row's format is recognised (TRL messages or prompt/completion, the authors'
    # content/teacher_response, prompt/response; docs/config.md "Data formats"); a name set here
    # is the only column read. The prompt: a string or a list of {role, content} messages.
    prompt_key: str | None = None
    response_key: str | None = None
    system_prompt: str | None = None
    # a Jinja chat template used instead of the tokenizer's own: the text, or a file's path
    # (read once here, so the config carries the text to every node and checkpoint)
    chat_template: str | None = None
    max_prompt_length: int = Field(2048, gt=0)
    max_response_length: int = Field(1536, gt=0)
    prompt_truncation: Literal["drop", "left", "right", "error"] = "drop"
    on_bad_row: Literal["error", "skip"] = "error"
    prompts_per_step: int = Field(256, gt=0)
    shuffle: bool = True
    limit: int | None = Field(None, gt=0)

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        """Template text stays; any other value is a file's path, replaced by its text."""
        if value is None or "{{" in value or "{%" in value:
            return value
        path = os.path.expanduser(value)
        if not os.path.isfile(path):
            raise ValueError(
                "neither a Jinja template (no '{{' or '{%') nor the path of an existing file"
            )
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "{{" not in text and "{%" not in text:
            raise ValueError(f"the file {value!r} holds no Jinja template")
        return text


class RolloutConfig(Strict):
    backend: Literal["vllm", "hf"] = "vllm"
    num_workers: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)  # set by the cluster preset; tp size on GPU
    gpu_memory_utilization: float = Field(0.7, gt=0, le=1)
    kv_cache_memory_bytes: int | None = Field(None, gt=0)  # CPU: bound vLLM's KV cache
    max_num_seqs: int = Field(256, ge=1)
    cpus_per_worker: float | None = Field(None, gt=0)  # None: GPU 1; CPU a share of the cores
    enforce_eager: bool = False
    weight_sync: Literal["auto", "object_store", "ipc", "nccl", "gloo"] = "auto"
    bucket_bytes: int = Field(256 * 2**20, gt=0)
    sleep_when_idle: bool = False  # colocated placement: vLLM sleeps while learners train


class LearnerConfig(Strict):
    backend: Literal["fsdp", "deepspeed"] = "fsdp"
    zero_stage: Literal[2, 3] = 3
    generator_ranks: int = Field(1, ge=1)
    discriminator_ranks: int = Field(1, ge=1)
    micro_batch_size: int = Field(4, ge=1)  # sequences per micro batch per rank
    # dynamic batching: tokens COMPUTED per micro batch and rank, rows x longest row (padded) or
    # the packed length; rows of neighbouring lengths share a micro batch (docs/placement.md)
    max_tokens_per_micro_batch: int | None = Field(None, gt=0)
    # packed sequences (no padding in the forward): auto packs under flash-attention's varlen
    # kernels only; true also under sdpa/eager (a block-causal mask); false pads
    packing: Literal["auto"] | bool = "auto"
    param_offload: bool = False
    optimizer_offload: bool = False
    reference_offload: bool = False
    # Between its own phases each learner moves its GPU state (fp32 master weights, Adam moments,
    # the generator's frozen reference) to CPU, holding ~0 GPU memory while vLLM or the other
    # learner runs on the same GPUs (colocated placement; ignored on CPU).
    offload_idle: bool = False
    # LoRA on one frozen base: ONE learner group holds the base once, G's adapter, D's adapter and
    # scalar head, and the KL reference (G's adapter as warmup left it); it serves both the
    # generator and the discriminator role (needs LoRA on both, D from the student, FSDP2)
    shared_base: bool = False
