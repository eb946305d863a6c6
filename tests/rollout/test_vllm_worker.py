"""RolloutWorker on the real vLLM CPU build, as a Ray actor, with the tiny model."""

import pytest
import ray
import torch

from gad_ray.config.schema import RolloutConfig
from gad_ray.models.loading import VLLM_CPU_ENV, load_causal_lm, load_tokenizer
from gad_ray.rollout.types import SamplingParams
from gad_ray.rollout.vllm_worker import RolloutWorker
from gad_ray.rollout.weight_sync import send_weights

from .helpers import force_eos, perturbed, reference_logprobs

MAX_LEN = 64
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [100, 200]]


@pytest.fixture(scope="module")
def worker(ray_session, tiny_model_dir):
    actor = ray.remote(RolloutWorker).options(num_cpus=1, runtime_env={"env_vars": VLLM_CPU_ENV})
    handle = actor.remote(str(tiny_model_dir), RolloutConfig(max_num_seqs=32), "auto", MAX_LEN, 0)
    ray.get(handle.health.remote())
    yield handle
    ray.kill(handle)


def gen(worker, prompts=PROMPTS, n=1, temperature=0.0, max_tokens=8, seed=None):
    return ray.get(
        worker.generate.remote(prompts, SamplingParams(n, temperature, 1.0, max_tokens), seed)
    )


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, min_new_tokens=0
    )
    return out[0, len(prompt) :].tolist()


def test_n_samples_per_prompt_prompt_major(worker):
    samples = gen(worker, n=4, temperature=1.0, max_tokens=6, seed=3)
    assert [s.prompt_index for s in samples] == [0] * 4 + [1] * 4 + [2] * 4
    for s in samples:
        assert s.length == len(s.logprobs) == 6 and s.finish_reason == "length"
        assert all(lp <= 0 for lp in s.logprobs)
    assert len({tuple(s.token_ids) for s in samples[:4]}) > 1  # n samples, not n copies


def test_same_seed_same_samples(worker):
    a = gen(worker, n=3, temperature=1.0, seed=11)
    b = gen(worker, n=3, temperature=1.0, seed=11)
    c = gen(worker, n=3, temperature=1.0, seed=12)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    # a prompt's samples depend on its index + seed only, not on the rest of the batch
    alone = ray.get(worker.generate.remote([PROMPTS[1]], SamplingParams(3, 1.0, 1.0, 8), 11, [1]))
    assert [s.token_ids for s in alone] == [s.token_ids for s in a[3:6]]


def test_logprobs_match_learner_recomputation_at_the_sampling_temperature(worker, tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir)).eval()
    samples = gen(worker, n=2, temperature=0.8, max_tokens=10, seed=5)
    for s in samples:  # vLLM's processed log-probs: softmax(logits / 0.8)
        ref = reference_logprobs(model, PROMPTS[s.prompt_index], s, 0.8)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-4, rtol=0)
        raw = reference_logprobs(model, PROMPTS[s.prompt_index], s, 1.0)
        assert (ref - raw).abs().max() > 1e-2  # T = 1 log-probs would not pass the check above


def test_every_sample_has_its_own_seed(worker):
    """Sample j of prompt i must not share an RNG stream with sample j-1 of prompt i+1 (as
    ``seed + i + j`` would make it): the same prompt twice in a batch gets different samples."""
    same = [[5, 6, 7], [5, 6, 7]]
    a = gen(worker, prompts=same, n=2, temperature=1.0, max_tokens=8, seed=0)
    assert len({tuple(s.token_ids) for s in a}) == 4
    b = gen(worker, prompts=same, n=2, temperature=1.0, max_tokens=8, seed=1)
    assert not {tuple(s.token_ids) for s in a} & {tuple(s.token_ids) for s in b}


def test_truncation_at_max_tokens_and_context(worker):
    (s,) = gen(worker, prompts=[[7] * 3], max_tokens=5)
    assert (s.length, s.finish_reason) == (5, "length")
    (s,) = gen(worker, prompts=[[7] * (MAX_LEN - 4)], max_tokens=50)
    assert (s.length, s.finish_reason) == (4, "length")  # stopped by the context
    # more prompt tokens than one engine step takes (4096), seeded: no chunked-prefill crash
    many = gen(worker, prompts=[[7] * (MAX_LEN - 1)] * 80, temperature=1.0, max_tokens=1, seed=0)
    assert [s.finish_reason for s in many] == ["length"] * 80


def test_bad_prompts_raise_clear_errors_and_worker_keeps_serving(worker):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen(worker, prompts=[[1, 2], []])
    with pytest.raises(ValueError, match=f"prompt 0 has {MAX_LEN} tokens.*context is {MAX_LEN}"):
        gen(worker, prompts=[[3] * MAX_LEN])
    with pytest.raises(ValueError, match=r"token id 99999 outside the vocabulary \[0, 2048\)"):
        gen(worker, prompts=[[3, 99999]])
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        gen(worker, max_tokens=0)
    assert len(gen(worker)) == len(PROMPTS)


def test_weight_update_greedy_equals_hf_with_new_weights(worker, tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir)).eval()
    before = [s.token_ids for s in gen(worker, max_tokens=12)]
    assert before == [hf_greedy(model, p, 12) for p in PROMPTS]
    perturbed(model)
    stats = send_weights(model.state_dict().items(), [worker], 64 * 1024, "object_store")
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert stats["bytes"] == nbytes and stats["buckets"] > 1 and stats["seconds"] > 0
    after = [s.token_ids for s in gen(worker, max_tokens=12)]  # same prompts: prefix cache reset
    assert after == [hf_greedy(model, p, 12) for p in PROMPTS]
    assert after != before
    samples = gen(worker, n=2, temperature=1.0, max_tokens=6, seed=0)
    for s in samples:
        ref = reference_logprobs(model, PROMPTS[s.prompt_index], s)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-4, rtol=0)


def test_eos_gives_stop_after_broadcast_sync(worker, tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir)).eval()
    eos = load_tokenizer(str(tiny_model_dir)).eos_token_id
    force_eos(model, eos)
    send_weights(model.state_dict().items(), [worker], 2**20, "gloo")
    assert [(s.token_ids, s.finish_reason) for s in gen(worker)] == [([eos], "stop")] * 3
    for s in gen(worker, n=2, temperature=1.0, max_tokens=50, seed=0):
        assert s.finish_reason == "stop" and s.token_ids[-1] == eos and eos not in s.token_ids[:-1]
    original = load_causal_lm(str(tiny_model_dir))
    send_weights(original.state_dict().items(), [worker], 2**20, "gloo")
    assert [s.token_ids for s in gen(worker)] == [hf_greedy(original, p, 8) for p in PROMPTS]


def test_ipc_sync_in_small_buckets_equals_object_store_sync(worker, tiny_model_dir):
    """ipc in 16 KiB buckets splits layers across buckets; vLLM keeps views into a layer's
    earlier buckets until the layer is complete, so a sender that reused a bucket's memory
    after its ack would corrupt them. The samples and log-probs must equal those of the same
    weights sent through the object store, and greedy decoding HF's."""
    model = load_causal_lm(str(tiny_model_dir)).eval()
    perturbed(model, seed=5)
    state = model.state_dict()
    send_weights(state.items(), [worker], 2**20, "object_store")
    want = gen(worker, n=2, temperature=1.0, max_tokens=8, seed=4)
    original = load_causal_lm(str(tiny_model_dir)).state_dict()
    send_weights(original.items(), [worker], 2**20, "object_store")
    before = gen(worker, n=2, temperature=1.0, max_tokens=8, seed=4)
    assert [s.token_ids for s in before] != [s.token_ids for s in want]  # the original again
    stats = send_weights(state.items(), [worker], 16 * 1024, "ipc")
    assert stats["buckets"] > len(state) // 2
    got = gen(worker, n=2, temperature=1.0, max_tokens=8, seed=4)
    assert [(s.token_ids, s.logprobs) for s in got] == [(s.token_ids, s.logprobs) for s in want]
    assert [s.token_ids for s in gen(worker)] == [hf_greedy(model, p, 8) for p in PROMPTS]
    send_weights(original.items(), [worker], 2**20, "ipc")


def test_sleep_is_a_reported_noop_on_cpu(worker):
    reply = ray.get(worker.sleep.remote(1))
    assert reply == {"supported": False, "reason": "vLLM sleep mode is not available on cpu"}
    assert ray.get(worker.wake_up.remote(["weights"]))["supported"] is False
    assert ray.get(worker.health.remote())["sleeping"] == []
    assert len(gen(worker)) == len(PROMPTS)
