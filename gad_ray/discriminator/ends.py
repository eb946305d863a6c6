"""D's input ends every response the same way (docs/algorithms.md §1.2).

A teacher response is re-tokenized and gets the tokenizer's EOS appended; a student sample ends
with whichever end id sampling stopped at: the tokenizer's EOS or any of the generation
config's ``eos_token_id`` (Qwen2.5-Instruct: ``<|im_end|>`` and ``<|endoftext|>``). A student
row ending with an id no teacher row ends with would let D separate them by that token alone,
so D's input (never G's: its log-probs are those of the sampled tokens) ends every response that
stopped at an end id with the tokenizer's EOS. A truncated response (no end id) stays as is.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, GenerationConfig

from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch
from gad_ray.models.loading import load_tokenizer, resolve_model_path
from gad_ray.models.score_head import last_response_index


def _ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list) else [value])}


@dataclasses.dataclass(frozen=True)
class ResponseEnds:
    """``eos``: the id a teacher response ends with (the tokenizer's EOS); ``stops``: every id
    a student sample may end with (``eos`` too)."""

    eos: int
    stops: frozenset[int]

    @classmethod
    def of(cls, cfg: Config) -> ResponseEnds:
        """The student's: its tokenizer's EOS, and the end ids of its generation config (of
        its model config when it has no generation config), which the rollout stops at."""
        s = cfg.model.student
        eos = load_tokenizer(s.tokenizer or s.path).eos_token_id
        if eos is None:
            raise ValueError(f"the tokenizer of {s.tokenizer or s.path!r} has no EOS token")
        path = resolve_model_path(s.path)
        try:
            stops = _ids(GenerationConfig.from_pretrained(path).eos_token_id)
        except OSError:  # no generation_config.json
            stops = set()
        stops = stops or _ids(getattr(AutoConfig.from_pretrained(path), "eos_token_id", None))
        return cls(int(eos), frozenset(stops | {int(eos)}))

    def normalise(self, batch: TokenBatch) -> TokenBatch:
        """A copy of ``batch`` whose responses ending with one of ``stops`` end with ``eos``
        (``batch`` itself is left as it is). Every row needs a response token."""
        rows = torch.arange(len(batch))
        last = last_response_index(batch.response_mask)
        ids = batch.input_ids.clone()
        stops = torch.tensor(sorted(self.stops), dtype=ids.dtype)
        ended = torch.isin(ids[rows, last], stops)
        ids[rows[ended], last[ended]] = self.eos
        return dataclasses.replace(batch, input_ids=ids)
