"""Adapter-only weight sync: the rollout workers (vLLM-CPU with its LoRA support, and HF with
peft) load the base once and receive only G's LoRA adapter after each update; their greedy
outputs equal those of the merged model the generator exports."""

import json

import pytest
import ray
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from gad_ray.config.schema import RolloutConfig
from gad_ray.learner import GeneratorGroup
from gad_ray.models.loading import VLLM_CPU_ENV
from gad_ray.rollout.hf_worker import HFRolloutWorker
from gad_ray.rollout.types import SamplingParams
from gad_ray.rollout.vllm_worker import RolloutWorker
from gad_ray.rollout.weight_sync import send_weights
from tests.config_builder import make_config
from tests.learner.conftest import make_token_batch
from tests.learner.test_lora import lora_cfg

MAX_LEN = 64
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [100, 200]]


@pytest.fixture(scope="module")
def setup(ray_session, tiny_model_dir):
    # lr 1e-2: a few steps change greedy outputs
    cfg = make_config(base=lora_cfg(tiny_model_dir), algorithm__generator_optim__lr=1e-2)
    rank = cfg.model.student.lora.rank
    path = str(tiny_model_dir)
    vllm = (
        ray.remote(RolloutWorker)
        .options(num_cpus=1, runtime_env={"env_vars": VLLM_CPU_ENV})
        .remote(path, RolloutConfig(max_num_seqs=32), "auto", MAX_LEN, 0, rank)
    )
    hf = (
        ray.remote(HFRolloutWorker)
        .options(num_cpus=1)
        .remote(path, RolloutConfig(backend="hf"), "auto", MAX_LEN, 0, rank)
    )
    group = GeneratorGroup(cfg)
    ray.get([vllm.health.remote(), hf.health.remote()])
    yield group, {"vllm": vllm, "hf": hf}
    group.shutdown()
    ray.kill(vllm)
    ray.kill(hf)


def greedy(worker, max_tokens: int = 10) -> list[list[int]]:
    samples = ray.get(worker.generate.remote(PROMPTS, SamplingParams.greedy(max_tokens), None))
    return [s.token_ids for s in samples]


def hf_greedy(model, max_tokens: int = 10) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        ids = model.generate(
            torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, min_new_tokens=0
        )
        out.append(ids[0, len(p) :].tolist())
    return out


def test_adapter_sync_gives_the_merged_models_greedy_outputs(setup, tiny_model_dir, tmp_path):
    """Two updates of G (two SFT steps each), each followed by an adapter sync: both workers
    serve version v and answer like the merged model G exports."""
    group, workers = setup
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert greedy(workers["vllm"]) == greedy(workers["hf"]) == hf_greedy(base)
    full_bytes = 4 * sum(p.numel() for p in base.parameters())
    batch = make_token_batch(seed=3, n=6)
    for version in (1, 2):
        for _ in range(2):
            group.train_sft(batch)
        stats = group.sync_weights(list(workers.values()))
        assert 0 < stats["bytes"] < 0.1 * full_bytes  # only the adapter travels
        group.save_pretrained(str(tmp_path / f"v{version}"))
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"v{version}", dtype=torch.float32)
        want = hf_greedy(merged)
        assert greedy(workers["vllm"]) == want
        assert greedy(workers["hf"]) == want
        assert ray.get(workers["vllm"].health.remote())["lora_version"] == version
    assert want != hf_greedy(base)  # the adapter changed the outputs


@pytest.mark.parametrize("method", ["gloo", "ipc"])
def test_adapter_over_broadcast_and_ipc_equals_merged(setup, tiny_model_dir, method):
    """A peft adapter with random B sent over gloo / shared memory in small buckets."""
    _, workers = setup
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rank = 4
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(len(method))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    tensors = get_peft_model_state_dict(peft)
    config = json.loads(json.dumps(peft.peft_config["default"].to_dict(), default=sorted))
    config["base_model_name_or_path"] = str(tiny_model_dir)
    stats = send_weights(tensors.items(), list(workers.values()), 4096, method, adapter=config)
    assert stats["buckets"] > 1
    want = hf_greedy(peft.merge_and_unload())
    assert greedy(workers["vllm"]) == greedy(workers["hf"]) == want
