"""Forward passes of the sharded (FSDP2) models, in this process on a one-rank gloo group:
D returns a fresh tensor (FSDP2 warns that an in-place op on a returned view would skip its
pre-backward all-gather), and G's entropy keeps no [tokens, vocab] graph unless it is in the
loss."""

import warnings

import pytest
import torch
import torch.distributed as dist

from gad_ray.config.schema import LearnerConfig, OptimConfig
from gad_ray.discriminator.model import DiscriminatorModel
from gad_ray.learner.backends import build_engine
from gad_ray.learner.generator import policy_logprobs
from gad_ray.models.loading import load_causal_lm
from tests.learner.conftest import make_token_batch


@pytest.fixture(scope="module")
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _engine(model):
    """FSDP2 with bf16 compute over fp32 masters (the GPU presets' path)."""
    return build_engine(model, LearnerConfig(), OptimConfig(), torch.device("cpu"), torch.bfloat16)


def test_discriminator_forward_returns_a_fresh_tensor(one_rank, tiny_model_dir):
    engine = _engine(DiscriminatorModel.from_pretrained(str(tiny_model_dir)))
    batch = make_token_batch(seed=0, n=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = engine.module(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            response_mask=batch.response_mask,
        )
        scores.float().sum().backward()
    assert scores.shape == (3,) and scores._base is None  # not a view of the head's output
    assert not [w for w in caught if "view tensor" in str(w.message)]


def test_entropy_keeps_a_graph_only_when_it_is_in_the_loss(one_rank, tiny_model_dir):
    engine = _engine(load_causal_lm(str(tiny_model_dir)))
    batch = make_token_batch(seed=1, n=3)
    logp, metric = policy_logprobs(engine.module, batch, 0.8, entropy=True)
    assert logp.requires_grad and not metric.requires_grad  # a metric: no vocab-sized graph
    logp, bonus = policy_logprobs(engine.module, batch, 0.8, entropy=True, entropy_grad=True)
    assert bonus.requires_grad
    torch.testing.assert_close(bonus.detach(), metric)  # the same values either way
