"""Both rollout backends (vLLM-CPU and HF, as Ray actors) sample exactly what the learner computes:
``softmax(logits / T)`` of the model, whatever the model's generation config says. The model here
saves a generation config with a repetition penalty of 2, top-k 5, top-p 0.5, its own temperature
and two EOS ids (Qwen2.5-Instruct's shape: ``<|im_end|>`` and ``<|endoftext|>``): the backends
read the EOS ids from it and nothing else.

Tolerance 1e-4 per token: rollout and learner both run the fp32 weights on CPU and differ only
in kernels (summation order, ~1e-6); the generation config's penalty divides a repeated token's
logit by 2 and its top-k / top-p renormalise over a few tokens, each moving log-probs by > 1e-2.
"""

import pytest
import ray
import torch
from transformers import GenerationConfig

from gad_ray.config.schema import RolloutConfig
from gad_ray.data.batch import make_batch
from gad_ray.learner.generator import policy_logprobs
from gad_ray.models.loading import VLLM_CPU_ENV, load_causal_lm, load_tokenizer
from gad_ray.models.tiny import build_tiny_model
from gad_ray.rollout.base import backend_class
from gad_ray.rollout.types import SamplingParams
from gad_ray.rollout.weight_sync import send_weights

from .helpers import force_eos

MAX_LEN = 64
T = 0.7
# prompts with repeated tokens, so that a repetition penalty acts from the first step on
PROMPTS = [[5, 6, 7, 5, 6, 7], [9, 10, 11, 12, 13, 9], [100, 200, 100, 200]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("genconfig-tiny"))
    tok = load_tokenizer(str(path))
    GenerationConfig(
        do_sample=True,
        temperature=0.3,
        repetition_penalty=2.0,
        top_k=5,
        top_p=0.5,
        bos_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id, tok.pad_token_id],  # <|im_end|>, <|endoftext|>
        pad_token_id=tok.pad_token_id,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def workers(ray_session, model_dir):
    """One actor of each backend on the model above."""
    handles = {}
    for name in ("vllm", "hf"):
        actor = ray.remote(backend_class(name)).options(
            num_cpus=1, runtime_env={"env_vars": dict(VLLM_CPU_ENV)}
        )
        cfg = RolloutConfig(backend=name, max_num_seqs=32)
        handles[name] = actor.remote(str(model_dir), cfg, "auto", MAX_LEN, 0)
    ray.get([h.health.remote() for h in handles.values()])
    yield handles
    for h in handles.values():
        ray.kill(h)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_causal_lm(str(model_dir)).eval()


def learner_logprobs(model, prompt: list[int], response: list[int], temperature: float):
    """The learner's log-probs of ``response`` (``policy_logprobs``, as in G's GRPO update)."""
    mb = make_batch([prompt], [response], pad_id=0)
    with torch.no_grad():
        logp, _ = policy_logprobs(model, mb, temperature)
    return logp[0, len(prompt) : len(prompt) + len(response)]


def learner_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """The argmax of the learner's logits, token by token (no processor of any kind)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_sample_logprobs_are_the_learners_at_the_sampling_temperature(workers, model, backend):
    samples = ray.get(workers[backend].generate.remote(PROMPTS, SamplingParams(4, T, 1.0, 16), 3))
    assert len(samples) == 12 and len({tuple(s.token_ids) for s in samples}) > 3
    for s in samples:
        want = learner_logprobs(model, PROMPTS[s.prompt_index], s.token_ids, T)
        got = torch.tensor(s.logprobs)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=f"{backend}: {s}")


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_greedy_is_the_learners_argmax(workers, model, model_dir, backend):
    got = [
        s.token_ids
        for s in ray.get(workers[backend].generate.remote(PROMPTS, SamplingParams.greedy(12)))
    ]
    assert got == [learner_greedy(model, p, 12) for p in PROMPTS]
    # not vacuous: HF greedy under the model's own generation config (its repetition penalty)
    # picks other tokens for these prompts
    penalised = [
        model.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[
            0, len(p) :
        ].tolist()
        for p in PROMPTS
    ]
    assert penalised != got


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_stops_at_each_eos_id_of_the_generation_config_and_no_other(workers, model_dir, backend):
    """The generation config lists ``<|im_end|>`` (the tokenizer's EOS) and ``<|endoftext|>``:
    a response ends at either (finish ``stop``, the id kept as its last token); a model that
    always emits another special token (``<|im_start|>``) runs to ``max_tokens``."""
    tok = load_tokenizer(str(model_dir))
    worker = workers[backend]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    cases = [(tok.eos_token_id, "stop"), (tok.pad_token_id, "stop"), (im_start, "length")]
    try:
        for token, reason in cases:
            edited = load_causal_lm(str(model_dir)).eval()
            force_eos(edited, token)  # makes `token` by far the likeliest next token
            send_weights(edited.state_dict().items(), [worker], 2**20, "object_store")
            want = [token] if reason == "stop" else [token] * 6
            for temperature in (0.0, 1.0):
                samples = ray.get(
                    worker.generate.remote(PROMPTS, SamplingParams(2, temperature, 1.0, 6), 0)
                )
                assert [(s.token_ids, s.finish_reason) for s in samples] == [(want, reason)] * 6
    finally:  # the other tests' weights
        original = load_causal_lm(str(model_dir))
        send_weights(original.state_dict().items(), [worker], 2**20, "object_store")
