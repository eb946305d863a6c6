"""Padded prompt+response batches, balanced partitions and micro-batch splitting.

Layout: row ``i`` of a :class:`TokenBatch` is ``prompt_i + response_i`` followed by right padding.
Per-token quantities elsewhere (logprobs, advantages, ...) are ``[B, T]`` tensors aligned with
``input_ids``: the value at position ``t`` concerns token ``t``, zero off the response.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, fields

import torch


@dataclass
class TokenBatch:
    """``input_ids`` / ``attention_mask`` ``[B, T]`` long, ``response_mask`` ``[B, T]`` float32
    (1.0 exactly on response tokens), ``prompt_lens`` / ``response_lens`` ``[B]`` long."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_lens: torch.Tensor
    response_lens: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(TokenBatch)})

    def select(self, indices: list[int]) -> TokenBatch:
        """Rows ``indices`` (in that order), trailing all-padding columns trimmed."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.input_ids.device)
        lens = self.prompt_lens[idx] + self.response_lens[idx]
        t = int(lens.max()) if len(indices) else 0
        return TokenBatch(
            input_ids=self.input_ids[idx, :t],
            attention_mask=self.attention_mask[idx, :t],
            response_mask=self.response_mask[idx, :t],
            prompt_lens=self.prompt_lens[idx],
            response_lens=self.response_lens[idx],
        )

    def num_tokens(self) -> int:
        """Non-padding tokens in the batch."""
        return int(self.attention_mask.sum())

    def seq_lens(self) -> list[int]:
        """Prompt + response length of each row (the weights for :func:`split_for_ranks`)."""
        return (self.prompt_lens + self.response_lens).tolist()

    def response_tokens(self, i: int) -> list[int]:
        p, r = int(self.prompt_lens[i]), int(self.response_lens[i])
        return self.input_ids[i, p : p + r].tolist()


def make_batch(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int
) -> TokenBatch:
    """Right-padded ``prompt + response`` rows; empty responses are allowed here."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    b = len(prompt_ids)
    p_lens = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    r_lens = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
    t = int((p_lens + r_lens).max()) if b else 0
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    response_mask = torch.zeros((b, t), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, len(p) : n] = 1.0
    return TokenBatch(input_ids, attention_mask, response_mask, p_lens, r_lens)


def concat_batches(a: TokenBatch, b: TokenBatch) -> TokenBatch:
    """Rows of ``a`` then rows of ``b``, right-padded (pad id 0, masked) to the longer width."""
    t = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, t - x.shape[1]))

    return TokenBatch(
        input_ids=torch.cat([pad(a.input_ids), pad(b.input_ids)]),
        attention_mask=torch.cat([pad(a.attention_mask), pad(b.attention_mask)]),
        response_mask=torch.cat([pad(a.response_mask), pad(b.response_mask)]),
        prompt_lens=torch.cat([a.prompt_lens, b.prompt_lens]),
        response_lens=torch.cat([a.response_lens, b.response_lens]),
    )


def balanced_partition(weights: list[int], k: int, equal_size: bool = False) -> list[list[int]]:
    """Split ``range(len(weights))`` into ``k`` groups of near-equal weight sums.

    Greedy longest-processing-time: indices by decreasing weight (ties by index) go to the group
    with the lowest sum (ties: fewer items, then lower group number). Without ``equal_size`` group
    sizes are unconstrained (the largest sum exceeds the mean by at most the largest weight); with
    it, sizes differ by at most one (the first ``len % k`` groups get the extra item). Groups may
    be empty when ``len(weights) < k``. Each group's indices are sorted. Deterministic.
    """
    if k < 1:
        raise ValueError(f"cannot partition into k={k} groups")
    n = len(weights)
    caps = [n // k + (g < n % k) if equal_size else n for g in range(k)]
    groups: list[list[int]] = [[] for _ in range(k)]
    heap = [(0, 0, g) for g in range(k)]  # (sum, size, group)
    for i in sorted(range(n), key=lambda i: (-weights[i], i)):
        full = []
        while True:
            total, size, g = heapq.heappop(heap)
            if size < caps[g]:
                break
            full.append((total, size, g))
        groups[g].append(i)
        heapq.heappush(heap, (total + weights[i], size + 1, g))
        for item in full:
            heapq.heappush(heap, item)
    return [sorted(g) for g in groups]


def micro_batch_tokens(lengths: list[int], packed: bool) -> int:
    """Tokens the learner computes for one micro-batch of rows of ``lengths``: their sum when
    packed (one row, no padding), else rows x the longest row (right-padded)."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


def micro_batches(
    lengths: list[int],
    micro_batch_size: int | None,
    max_tokens: int | None,
    packed: bool = False,
) -> list[list[int]]:
    """Split ``range(len(lengths))`` into micro-batches.

    With ``max_tokens`` (takes precedence) the budget bounds the tokens COMPUTED
    (:func:`micro_batch_tokens`): padded, rows x longest row, met by runs of the rows in
    decreasing length, each as long as its first (longest) row allows, so a micro-batch holds
    rows of neighbouring lengths and computes few padding tokens (the fewest micro-batches of
    such runs); ``packed``, the sum of the lengths, met by first-fit decreasing bin packing. A
    row longer than the budget gets a micro-batch of its own. Otherwise ``ceil(n /
    micro_batch_size)`` micro-batches of at most ``micro_batch_size`` rows (sizes differ by at
    most one) of neighbouring lengths. Micro-batches are ordered by first index, each sorted;
    deterministic; none is empty.
    """
    n = len(lengths)
    if n == 0:
        return []
    if max_tokens is None:
        if micro_batch_size is None or micro_batch_size < 1:
            raise ValueError(
                f"need micro_batch_size >= 1 or max_tokens, got micro_batch_size="
                f"{micro_batch_size} max_tokens={max_tokens}"
            )
        k = math.ceil(n / micro_batch_size)
        by_length = sorted(range(n), key=lambda i: (lengths[i], i))
        bounds = [g * (n // k) + min(g, n % k) for g in range(k + 1)]
        return sorted(sorted(by_length[a:b]) for a, b in itertools.pairwise(bounds))
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    by_length = sorted(range(n), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    if packed:  # first-fit decreasing
        sums: list[int] = []
        for i in by_length:
            g = next((g for g, s in enumerate(sums) if s + lengths[i] <= max_tokens), None)
            if g is None:
                groups.append([i])
                sums.append(lengths[i])
            else:
                groups[g].append(i)
                sums[g] += lengths[i]
    else:  # runs of decreasing length, each padded to its first row
        for i in by_length:
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
    return sorted(sorted(g) for g in groups)


def _split_to_multiple(
    groups: list[list[int]], lengths: list[int], k: int, packed: bool
) -> list[list[int]]:
    """Split micro-batches in two (the one computing the most tokens first) until their number
    is a multiple of ``k`` or none has two rows left; a half never computes more tokens."""

    def cost(g: list[int]) -> tuple[int, int]:
        return micro_batch_tokens([lengths[i] for i in g], packed), len(g)

    groups = [sorted(g, key=lambda i: (-lengths[i], i)) for g in groups]
    while len(groups) % k:
        split = [g for g in groups if len(g) > 1]
        if not split:
            break
        g = max(split, key=cost)
        groups.remove(g)
        # padded: the longer half and the shorter half; packed: alternate rows (equal sums)
        halves = [g[0::2], g[1::2]] if packed else [g[: len(g) // 2], g[len(g) // 2 :]]
        groups += halves
    return groups


def split_for_ranks(
    lengths: list[int],
    num_ranks: int,
    micro_batch_size: int | None,
    max_tokens: int | None,
    packed: bool = False,
) -> list[list[list[int]]]:
    """Per rank, its micro-batches (indices into the global batch).

    By ``max_tokens`` (a budget of computed tokens, padded or ``packed``, see
    :func:`micro_batches`): the whole batch is cut into micro-batches of neighbouring lengths,
    split further until their number is a multiple of ``num_ranks`` where rows allow, and dealt
    out by decreasing computed tokens, ``num_ranks`` at a time (in alternating rank order), so
    the i-th micro-batches of all ranks, which run their collectives in lockstep, compute about
    as much. By ``micro_batch_size``: rows are spread over ranks in equal counts with
    :func:`balanced_partition`, then each rank's share is split with :func:`micro_batches`.

    Every rank gets the SAME number of micro-batches, as FSDP/ZeRO collectives require: ranks
    with fewer are padded at the end with EMPTY micro-batches (``[]``), for which the learner
    must still run a forward/backward that contributes zero loss (e.g. on a dummy sequence) so
    the collectives line up.
    """
    if max_tokens is None:
        out = []
        for idx in balanced_partition(lengths, num_ranks, equal_size=True):
            mbs = micro_batches([lengths[i] for i in idx], micro_batch_size, None)
            out.append([[idx[j] for j in mb] for mb in mbs])
    else:
        groups = micro_batches(lengths, None, max_tokens, packed)
        groups = _split_to_multiple(groups, lengths, num_ranks, packed)
        groups.sort(key=lambda g: (-micro_batch_tokens([lengths[i] for i in g], packed), min(g)))
        out = [[] for _ in range(num_ranks)]
        for c in range(0, len(groups), num_ranks):
            ranks = range(num_ranks) if c // num_ranks % 2 == 0 else reversed(range(num_ranks))
            for r, g in zip(ranks, groups[c : c + num_ranks], strict=False):
                out[r].append(sorted(g))
    m = max(len(r) for r in out)
    return [r + [[] for _ in range(m - len(r))] for r in out]
