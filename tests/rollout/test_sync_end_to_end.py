"""Learner -> rollout weight sync end to end: a 2-rank FSDP2 generator (gloo) takes an SFT step,
pushes its weights into a vLLM rollout group, and vLLM's log-probs of its own samples equal the
learner's recomputation: for Qwen2 with tied embeddings (``tiny``, the driver tests' model) and
with a separate lm_head (``small``), and for the Llama layout (``tiny-llama``, tied)."""

import pytest
import torch

from gad_ray.config.schema import Config
from gad_ray.data.batch import TokenBatch, make_batch
from gad_ray.learner.generator import GeneratorGroup
from gad_ray.models.loading import load_tokenizer, resolve_model_path
from gad_ray.rollout.group import RolloutGroup
from gad_ray.rollout.types import Sample, SamplingParams
from tests.config_builder import make_config

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [100, 200], [42] * 6]
TARGETS = [[20, 21, 22], [30, 31], [40, 41, 42, 43], [50]]
MAX_TOKENS = 8


def seqkd_cfg(path: str) -> Config:
    return make_config(
        hydra=False,
        model__student={"path": path, "max_context": 64},
        algorithm={"name": "seqkd", "generator_optim": {"lr": 1e-3}},
        data={"train_path": "unused.jsonl", "max_prompt_length": 32, "max_response_length": 16},
        learner={"generator_ranks": 2, "micro_batch_size": 2},
        rollout={"max_num_seqs": 32, "kv_cache_memory_bytes": 32 * 2**20},
    )


def learner_logprobs(
    generator: GeneratorGroup, samples: list[Sample], pad_id: int
) -> list[torch.Tensor]:
    """The learner's log-probs of each sample's response tokens."""
    batch = make_batch(
        [PROMPTS[s.prompt_index] for s in samples], [s.token_ids for s in samples], pad_id
    )
    lps = generator.compute_logprobs(batch)
    return [row[batch.response_mask[i].bool()] for i, row in enumerate(lps)]


def max_gap(samples: list[Sample], learner: list[torch.Tensor]) -> float:
    return max(
        (torch.tensor(s.logprobs) - lp).abs().max().item()
        for s, lp in zip(samples, learner, strict=True)
    )


@pytest.mark.parametrize("spec", ["tiny:tiny", "tiny:small", "tiny:tiny-llama"])
def test_trained_weights_reach_vllm(ray_session, spec):
    path = resolve_model_path(spec)
    pad_id = load_tokenizer(path).pad_token_id
    cfg = seqkd_cfg(path)
    generator = GeneratorGroup(cfg, path, total_steps=1)
    rollout = RolloutGroup(cfg, path)
    try:
        before = rollout.generate(PROMPTS, SamplingParams(2, 1.0, 1.0, MAX_TOKENS), seed=0)
        assert max_gap(before, learner_logprobs(generator, before, pad_id)) < 1e-4  # same start

        teacher: TokenBatch = make_batch(PROMPTS, TARGETS, pad_id)
        generator.train_sft(teacher)
        moved = learner_logprobs(generator, before, pad_id)
        assert max_gap(before, moved) > 1e-2  # the step is visible in the log-probs

        generator.sync_weights(rollout.workers)
        after = rollout.generate(PROMPTS, SamplingParams(2, 1.0, 1.0, MAX_TOKENS), seed=1)
        assert all(s.length > 0 for s in after)
        gap = max_gap(after, learner_logprobs(generator, after, pad_id))
        assert gap < 1e-4, f"{spec}: vLLM samples from other weights than the learner's"
    finally:
        rollout.shutdown()
        generator.shutdown()
