"""D's scalar head and where it reads a row (docs/algorithms.md §2.1): the last response token.

Low in the house (torch only) so that the learners' LoRA stack and packing, and the
discriminator model, all read D's score the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def last_response_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position [B] of its final response token; raises naming rows with none."""
    has = response_mask.sum(dim=1) > 0
    if not bool(has.all()):
        rows = (~has).nonzero().flatten().tolist()
        raise ValueError(
            f"discriminator: rows {rows[:10]} of the batch ({response_mask.shape[0]} rows) have no "
            "response tokens; D(x, y) is read at the last response token"
        )
    t = response_mask.shape[1]
    return t - 1 - response_mask.flip(1).argmax(dim=1)


class ScoreHead(nn.Linear):
    """D's head ``Linear(hidden, 1, bias=False)``, computed in fp32: the input upcast, an fp32
    weight, fp32 scores, also under bf16 compute. The engines keep it so (``keep_fp32``):
    FSDP2 shards it as a unit of its own with an fp32 policy (its weight is the fp32 master);
    DeepSpeed holds every module parameter in bf16, so it sets ``fp32_master``, which returns
    the optimizer's full fp32 master of the weight (collective), and the forward computes with
    that value while the gradient still reaches the module's weight."""

    keep_fp32 = True

    def __init__(self, hidden: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(hidden, 1, bias=False, dtype=dtype)
        self.fp32_master: Callable[[], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float()
        if self.fp32_master is not None:
            w = w + (self.fp32_master().to(w.device).view_as(w) - w).detach()
        return F.linear(x.float(), w)


def head_scores(
    hidden: torch.Tensor,
    score: ScoreHead,
    response_mask: torch.Tensor | None,
    last_index: torch.Tensor | None,
) -> torch.Tensor:
    """Scores [B] (fp32 with a :class:`ScoreHead`): ``score`` at each row's ``last_index``
    (default: its last response token). ``hidden`` [1, N, h] of a packed micro-batch (B
    sequences in one row): ``last_index`` [B] are positions in that row."""
    if last_index is None:
        if response_mask is None:
            raise ValueError("DiscriminatorModel.forward needs response_mask or last_index")
        last_index = last_response_index(response_mask)
    rows = torch.arange(len(last_index), device=hidden.device) if hidden.shape[0] > 1 else 0
    h = hidden[rows, last_index.to(hidden.device)]
    # a fresh [B] tensor, not a view: FSDP2 hooks the root's output for its pre-backward
    # all-gather, and an in-place op on a view of it would skip that hook
    return score(h).squeeze(-1).clone()
