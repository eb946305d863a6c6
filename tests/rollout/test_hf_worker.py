"""HFRolloutWorker (transformers generate) behind the RolloutWorker interface, in-process."""

import pytest
import torch

from gad_ray.config.schema import RolloutConfig
from gad_ray.models.loading import load_causal_lm, load_tokenizer
from gad_ray.rollout.hf_worker import HFRolloutWorker
from gad_ray.rollout.types import SamplingParams
from gad_ray.rollout.weight_sync import iter_buckets, pack_bucket

from .helpers import force_eos, reference_logprobs

MAX_LEN = 48
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def worker(tiny_model_dir) -> HFRolloutWorker:
    return HFRolloutWorker(str(tiny_model_dir), RolloutConfig(backend="hf"), "auto", MAX_LEN, 0)


def test_samples_seeds_and_logprobs(worker, tiny_model_dir):
    a = worker.generate(PROMPTS, SamplingParams(3, 0.8, 0.9, 6), seed=4)
    assert [s.prompt_index for s in a] == [0, 0, 0, 1, 1, 1]
    assert all(s.length == len(s.logprobs) == 6 and s.finish_reason == "length" for s in a)
    assert len({tuple(s.token_ids) for s in a[:3]}) > 1
    b = worker.generate(PROMPTS, SamplingParams(3, 0.8, 0.9, 6), seed=4)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [
        s.token_ids for s in worker.generate(PROMPTS, SamplingParams(3, 0.8, 0.9, 6), seed=5)
    ] != [s.token_ids for s in a]
    model = load_causal_lm(str(tiny_model_dir)).eval()
    c = worker.generate(PROMPTS, SamplingParams(3, 0.8, 1.0, 6), seed=4)
    for s in c:  # log-probs at the sampling temperature, as the learner computes them
        ref = reference_logprobs(model, PROMPTS[s.prompt_index], s, 0.8)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-4, rtol=0)
        assert not torch.allclose(ref, reference_logprobs(model, PROMPTS[s.prompt_index], s))


def test_context_truncation_and_bad_prompts(worker):
    (s,) = worker.generate([[7] * (MAX_LEN - 3)], SamplingParams.greedy(20))
    assert (s.length, s.finish_reason) == (3, "length")
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        worker.generate([[]], SamplingParams(1, 1.0, 1.0, 4))
    with pytest.raises(ValueError, match=f"prompt 1 has {MAX_LEN + 2} tokens"):
        worker.generate([[1], [1] * (MAX_LEN + 2)], SamplingParams(1, 1.0, 1.0, 4))
    assert len(worker.generate(PROMPTS, SamplingParams.greedy(4))) == 2


def test_received_weights_and_stop_on_eos(worker, tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir)).eval()
    eos = load_tokenizer(str(tiny_model_dir)).eos_token_id
    force_eos(model, eos)
    worker.begin_weight_update()
    for bucket in iter_buckets(model.state_dict().items(), 100_000):
        metas, flat = pack_bucket(bucket)
        worker.receive_bucket(metas, flat.numpy())
    worker.finish_weight_update()
    assert [
        (s.token_ids, s.finish_reason) for s in worker.generate(PROMPTS, SamplingParams.greedy(8))
    ] == [([eos], "stop")] * 2
    for s in worker.generate(PROMPTS, SamplingParams(4, 1.0, 1.0, 40), seed=0):
        assert s.finish_reason == "stop" and s.token_ids[-1] == eos and eos not in s.token_ids[:-1]
    assert worker.sleep(1)["supported"] is False
