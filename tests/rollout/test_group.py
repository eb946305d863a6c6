"""RolloutGroup: one object over several vLLM workers (real Ray, vLLM CPU build)."""

import pytest
import ray

from gad_ray.config.schema import Config
from gad_ray.models.loading import load_causal_lm
from gad_ray.rollout import RolloutGroup, SamplingParams, send_weights
from tests.config_builder import make_config

from .helpers import perturbed

PROMPTS = [[5] * 20, [6, 7], [8, 9, 10], [11] * 12, [12], [13, 14, 15, 16]]


def rollout_cfg(model_dir, **rollout) -> Config:
    return make_config(
        hydra=False,
        model__student={"path": str(model_dir), "max_context": 64},
        algorithm__name="seqkd",
        data__train_path="unused.jsonl",
        rollout={"max_num_seqs": 32, **rollout},
    )


@pytest.fixture(scope="module")
def group(ray_session, tiny_model_dir):
    g = RolloutGroup(rollout_cfg(tiny_model_dir, num_workers=2), str(tiny_model_dir))
    yield g
    g.shutdown()


def test_group_returns_prompt_major_in_prompt_order(group):
    samples = group.generate(PROMPTS, SamplingParams(3, 1.0, 1.0, 6), seed=2)
    assert [s.prompt_index for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    # the same as one worker doing the whole batch: seeds follow the prompt index
    alone = ray.get(group.workers[1].generate.remote(PROMPTS, SamplingParams(3, 1.0, 1.0, 6), 2))
    assert [s.token_ids for s in samples] == [s.token_ids for s in alone]
    assert [s.finish_reason for s in samples] == ["length"] * len(samples)


def test_group_fewer_prompts_than_workers_and_errors(group):
    assert [s.prompt_index for s in group.generate([[3, 4]], SamplingParams(2, 0.0, 1.0, 4))] == [
        0,
        0,
    ]
    with pytest.raises(ValueError, match="prompt 3 is empty"):  # named by its index in the batch
        group.generate([[1], [2], [3, 4], [], [5]], SamplingParams(1, 1.0, 1.0, 4))
    assert len(group.generate(PROMPTS, SamplingParams.greedy(4))) == len(PROMPTS)


def test_group_weight_sync_and_sleep(group, tiny_model_dir):
    before = group.generate(PROMPTS, SamplingParams.greedy(8))
    model = load_causal_lm(str(tiny_model_dir))
    perturbed(model)
    stats = send_weights(model.state_dict().items(), group.workers, 2**20, "object_store")
    assert stats["bytes"] > 0
    after = group.generate(PROMPTS, SamplingParams.greedy(8))
    ref = ray.get(group.workers[0].generate.remote(PROMPTS, SamplingParams.greedy(8)))
    assert [s.token_ids for s in after] == [s.token_ids for s in ref]
    assert [s.token_ids for s in after] != [s.token_ids for s in before]
    assert [r["supported"] for r in group.sleep()] == [False, False]
    assert [r["supported"] for r in group.wake_up()] == [False, False]


def test_hf_backend_group(ray_session, tiny_model_dir):
    g = RolloutGroup(rollout_cfg(tiny_model_dir, backend="hf"), str(tiny_model_dir))
    try:
        assert g.info[0]["backend"] == "hf"
        samples = g.generate(PROMPTS[:2], SamplingParams(2, 1.0, 1.0, 5), seed=0)
        assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    finally:
        g.shutdown()
