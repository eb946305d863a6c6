"""The discriminator D (docs/algorithms.md §2): a causal-LM backbone + scalar head scored at the last response
token, trained with the Bradley-Terry loss by a group of Ray actors."""

from gad_ray.discriminator.learner import DiscriminatorGroup, DiscriminatorWorker
from gad_ray.discriminator.model import (
    DiscriminatorModel,
    check_discriminator_tokenizer,
    discriminator_source,
)
from gad_ray.models.score_head import last_response_index

__all__ = [
    "DiscriminatorGroup",
    "DiscriminatorModel",
    "DiscriminatorWorker",
    "check_discriminator_tokenizer",
    "discriminator_source",
    "last_response_index",
]
