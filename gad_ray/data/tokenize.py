"""Tokenize examples with the student's tokenizer and chat template (docs/algorithms.md §1.2).

prompt = ``apply_chat_template(messages, add_generation_prompt=True)`` with the tokenizer's template,
or ``data.chat_template`` when set; response = the text's
tokens followed by EOS, or, when that is longer than ``max_response_length``, exactly
``max_response_length`` text tokens without EOS (the way a student sample that hits the limit
ends), so teacher and student responses end the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gad_ray.config.schema import DataConfig
from gad_ray.data.dataset import DataError, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class TokenizedExample:
    """An :class:`Example` with prompt (and teacher response) token ids."""

    id: str
    prompt_ids: list[int]
    response_ids: list[int] | None
    response_truncated: bool
    messages: list[dict[str, str]]
    response: str | None
    meta: dict = field(default_factory=dict)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    template: str | None = None,
) -> list[int]:
    """Chat-template token ids of ``messages`` ending with the assistant generation prompt;
    ``template`` (Jinja text, ``data.chat_template``) replaces the tokenizer's own."""
    try:
        out = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=True
        )
    except Exception as e:  # jinja2's TemplateError and what the template raises itself
        if template is None:
            raise
        raise DataError(
            f"data.chat_template cannot render a prompt: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, list):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(t) for t in out]


def encode_response(
    tokenizer: PreTrainedTokenizerBase, text: str, max_len: int
) -> tuple[list[int], bool]:
    """``(ids, truncated)``: text tokens + EOS, or the first ``max_len`` text tokens (no EOS)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses must end with one")
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(ids) > max_len:
        return ids[:max_len], True
    return ids, False


def tokenize_examples(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> tuple[list[TokenizedExample], dict]:
    """Tokenize prompts and responses; handle long prompts per ``cfg.prompt_truncation``.

    ``drop`` removes the example, ``left`` keeps the last ``max_prompt_length`` tokens (the
    generation prompt survives), ``right`` keeps the first ones, ``error`` raises
    :class:`DataError`. Stats: ``examples`` (kept), ``dropped_long_prompts``,
    ``truncated_prompts``, ``truncated_responses``.
    """
    limit, mode = cfg.max_prompt_length, cfg.prompt_truncation
    stats = {"dropped_long_prompts": 0, "truncated_prompts": 0, "truncated_responses": 0}
    out = []
    for ex in examples:
        prompt_ids = encode_prompt(tokenizer, ex.messages, cfg.chat_template)
        if len(prompt_ids) > limit:
            if mode == "error":
                raise DataError(
                    f"example {ex.id!r} ({ex.meta.get('origin', 'unknown row')}): the prompt has "
                    f"{len(prompt_ids)} tokens > data.max_prompt_length={limit} "
                    "(data.prompt_truncation=error)"
                )
            if mode == "drop":
                stats["dropped_long_prompts"] += 1
                continue
            prompt_ids = prompt_ids[-limit:] if mode == "left" else prompt_ids[:limit]
            stats["truncated_prompts"] += 1
        response_ids, truncated = None, False
        if ex.response is not None:
            response_ids, truncated = encode_response(
                tokenizer, ex.response, cfg.max_response_length
            )
            stats["truncated_responses"] += truncated
        out.append(
            TokenizedExample(
                id=ex.id,
                prompt_ids=prompt_ids,
                response_ids=response_ids,
                response_truncated=truncated,
                messages=ex.messages,
                response=ex.response,
                meta=ex.meta,
            )
        )
    stats["examples"] = len(out)
    return out, stats
