"""Data pipeline: rows -> examples -> token ids -> padded batches, and the step loader."""

from gad_ray.data.batch import (
    TokenBatch,
    balanced_partition,
    make_batch,
    micro_batches,
    split_for_ranks,
)
from gad_ray.data.dataset import DataError, Example, load_examples, load_rows, parse_example
from gad_ray.data.loader import StepLoader
from gad_ray.data.tokenize import (
    TokenizedExample,
    encode_prompt,
    encode_response,
    tokenize_examples,
)

__all__ = [
    "DataError",
    "Example",
    "StepLoader",
    "TokenBatch",
    "TokenizedExample",
    "balanced_partition",
    "encode_prompt",
    "encode_response",
    "load_examples",
    "load_rows",
    "make_batch",
    "micro_batches",
    "parse_example",
    "split_for_ranks",
    "tokenize_examples",
]
