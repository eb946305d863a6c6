"""What a rollout worker returns, and the request checks every backend shares."""

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass
class Sample:
    """One sampled response: its prompt's index in the request, the response token ids (ending
    with EOS when ``finish_reason == "stop"``), the raw (not temperature-scaled) log-probability
    of each sampled token, and why generation ended (EOS, or ``max_tokens`` / the context)."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason

    @property
    def length(self) -> int:
        return len(self.token_ids)


def check_request(
    prompt_ids: list[list[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    max_model_len: int,
    vocab_size: int,
    prompt_indices: list[int] | None = None,
) -> None:
    """Raise ValueError naming the prompt (by ``prompt_indices``, default its position) or the
    argument that no backend can serve."""
    if n < 1:
        raise ValueError(f"n must be >= 1 samples per prompt, got {n}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
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
