"""An endless, resumable iterator over fixed-size batches of prompts (one batch per step)."""

from __future__ import annotations

import random
from collections.abc import Iterator

from gad_ray.data.dataset import DataError
from gad_ray.data.tokenize import TokenizedExample


class StepLoader:
    """Batches of ``batch_size`` examples, reshuffled every epoch from ``(seed, epoch)``.

    The last incomplete batch of an epoch is dropped. State: ``epoch`` and ``index`` (examples
    of this epoch's order already served) plus ``seed``; a loader restored with
    :meth:`load_state_dict` serves exactly the batches the uninterrupted one would.
    """

    def __init__(
        self,
        examples: list[TokenizedExample],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(examples) < batch_size:
            raise DataError(
                f"the dataset has {len(examples)} examples (after filtering), fewer than one "
                f"batch of data.prompts_per_step={batch_size}"
            )
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(f"gad-ray-loader-{self.seed}-{self.epoch}").shuffle(self._order)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> list[TokenizedExample]:
        """The next ``batch_size`` examples, moving to the next epoch when this one runs out."""
        if self.index + self.batch_size > len(self.examples):
            self.epoch += 1
            self.index = 0
        order = self._epoch_order()
        batch = [self.examples[i] for i in order[self.index : self.index + self.batch_size]]
        self.index += self.batch_size
        return batch

    def __iter__(self) -> Iterator[list[TokenizedExample]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (its seed replaces this loader's)."""
        missing = {"epoch", "index", "seed"} - set(state)
        if missing:
            raise DataError(f"loader state {state!r} is missing key(s) {sorted(missing)}")
        epoch, index, seed = (state[k] for k in ("epoch", "index", "seed"))
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(index, int)):
            raise DataError(f"loader state {state!r}: epoch and index must be ints >= 0")
        if not 0 <= index <= len(self.examples):
            raise DataError(
                f"loader state {state!r}: index {index} is outside a dataset of "
                f"{len(self.examples)} examples (was the dataset changed?)"
            )
        self.epoch, self.index, self.seed = epoch, index, int(seed)
        self._order_epoch = -1
