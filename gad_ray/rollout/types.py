"""What a rollout worker is asked for and returns, and the request checks every backend shares."""

from dataclasses import dataclass
from typing import Literal

import numpy as np

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: ``n`` responses per prompt from ``softmax(logits / temperature)``
    (``temperature=0``: greedy, its one response repeated ``n`` times), within the top-p
    nucleus, at most ``max_tokens`` tokens each. Nothing else shapes the distribution
    (docs/placement.md, "Sampling"). Invalid values raise ValueError naming the field."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1 samples per prompt, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @classmethod
    def greedy(cls, max_tokens: int) -> "SamplingParams":
        """One greedy response per prompt."""
        return cls(1, 0.0, 1.0, max_tokens)


@dataclass
class Sample:
    """One sampled response: its prompt's index in the request, the response token ids (ending
    with EOS when ``finish_reason == "stop"``), the log-probability of each sampled token under
    the distribution it was drawn from (``softmax(logits / temperature)``; raw logits when
    greedy), and why generation ended (EOS, or ``max_tokens`` / the context)."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason

    @property
    def length(self) -> int:
        return len(self.token_ids)


def sample_seed(seed: int, prompt_index: int, sample_index: int = 0) -> int:
    """A 31-bit seed of its own for sample ``sample_index`` of prompt ``prompt_index`` of a
    request seeded ``seed``: hashed, so no two (seed, prompt, sample) share an RNG stream (with
    ``seed + index`` prompt i's sample j would reuse prompt i+1's sample j-1, and one step's
    seeds the next step's)."""
    words = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, prompt_index, sample_index]
    return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)


def stop_token_ids(model_path: str) -> list[int]:
    """The ids a response ends at, the only thing a rollout backend reads from the model's
    generation config: its ``eos_token_id`` (one id or a list; the model config's when the
    generation config has none) plus the tokenizer's EOS, which vLLM always stops at. Sorted."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is None:
        eos = AutoConfig.from_pretrained(model_path).eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    try:
        tokenizer_eos = AutoTokenizer.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):  # no tokenizer beside the weights
        tokenizer_eos = None
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    if not ids:
        raise ValueError(
            f"model {model_path!r}: no EOS token id in its generation config, "
            "model config or tokenizer"
        )
    return sorted(ids)


def check_request(
    prompt_ids: list[list[int]],
    max_model_len: int,
    vocab_size: int,
    prompt_indices: list[int] | None = None,
) -> None:
    """Raise ValueError naming the prompt (by ``prompt_indices``, default its position) that no
    backend can serve."""
    indices = range(len(prompt_ids)) if prompt_indices is None else prompt_indices
    if len(indices) != len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(indices)} prompt indices")
    for i, ids in zip(indices, prompt_ids, strict=True):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty (0 tokens); every prompt needs >= 1 token")
        if len(ids) >= max_model_len:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, but the context is {max_model_len} tokens "
                f"(max_model_len), so a prompt may have at most {max_model_len - 1}"
            )
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})"
            )
