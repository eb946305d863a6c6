import gc
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from gad_ray.models.loading import (
    VLLM_CPU_ENV,
    VLLM_CPU_LLM_KWARGS,
    ModelLoadError,
    check_same_tokenizer,
    default_cache_dir,
    load_causal_lm,
    load_tokenizer,
    model_max_context,
    resolve_model_path,
)
from gad_ray.models.tiny import build_tokenizer


def test_resolve_local_dir_and_hub_name(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GAD_RAY_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("GAD_RAY_CACHE")
    assert str(default_cache_dir()).endswith(os.path.join(".cache", "gad_ray", "models"))


def test_resolve_tiny_builds_once_then_reuses(tmp_path):
    cache = tmp_path / "cache"
    first = resolve_model_path("tiny:tiny", cache_dir=str(cache))
    stamp = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    second = resolve_model_path("tiny:tiny", cache_dir=str(cache))
    assert first == second and os.path.dirname(first) == str(cache)
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == stamp
    llama = resolve_model_path("tiny:tiny-llama", cache_dir=str(cache))
    assert llama != first
    assert json.load(open(os.path.join(llama, "config.json")))["model_type"] == "llama"
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        os.path.basename(p) for p in (first, llama)
    )  # no temp build directories left behind
    model = load_causal_lm("tiny:tiny", cache_dir=str(cache))
    assert model.config.model_type == "qwen2" and model.dtype == torch.float32


def test_resolve_tiny_concurrent_builders_agree(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: resolve_model_path("tiny:tiny", str(tmp_path)), range(2)))
    assert paths[0] == paths[1]
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(paths[0])]
    assert load_tokenizer(paths[0]).eos_token == "<|im_end|>"


def test_load_tiny_model_and_tokenizer(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    model = load_causal_lm(str(tiny_model_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model_max_context(str(tiny_model_dir)) == 2048


def test_load_errors_name_the_offending_value(tmp_path, tiny_model_dir):
    missing = str(tmp_path / "no-such-model")
    for load in (load_tokenizer, load_causal_lm, model_max_context):
        with pytest.raises(ModelLoadError, match="no-such-model.*does not exist"):
            load(missing)
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="empty-dir.*no config.json"):
        load_causal_lm(str(empty))
    with pytest.raises(ModelLoadError, match="'huge'"):
        resolve_model_path("tiny:huge", cache_dir=str(tmp_path))
    with pytest.raises(ModelLoadError, match="'gpt2'"):
        load_tokenizer("tiny:tiny-gpt2", cache_dir=str(tmp_path))
    assert isinstance(ModelLoadError("x"), ValueError)

    no_template = tmp_path / "no-template"
    tok = build_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(no_template)
    shutil.copy(tiny_model_dir / "config.json", no_template / "config.json")
    with pytest.raises(ModelLoadError, match="no-template.*no chat template"):
        load_tokenizer(str(no_template))


def test_check_same_tokenizer(tiny_model_dir):
    student = load_tokenizer(str(tiny_model_dir))
    check_same_tokenizer(student, build_tokenizer(), "student", "discriminator")

    bigger = build_tokenizer()
    bigger.add_tokens(["<extra_token>"])
    with pytest.raises(ModelLoadError, match=r"proxy and student.*2049 vs 2048.*<extra_token>"):
        check_same_tokenizer(bigger, student, "proxy", "student")

    other_eos = build_tokenizer()
    other_eos.eos_token = "<|endoftext|>"
    with pytest.raises(ModelLoadError, match="eos_token '<\\|im_end\\|>' vs '<\\|endoftext\\|>'"):
        check_same_tokenizer(student, other_eos, "student", "discriminator")


def test_vllm_cpu_greedy_matches_hf_generate(tiny_model_dir, monkeypatch):
    for key, value in VLLM_CPU_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    tok = load_tokenizer(str(tiny_model_dir))
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
        )
        for text in ["Hello there, how are you?", "Write 3 words.", "x"]
    ]
    llm = LLM(model=str(tiny_model_dir), **VLLM_CPU_LLM_KWARGS, seed=0)
    try:
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=24)
        )
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for prompt, out in zip(prompts, outs, strict=True):
        got = list(out.outputs[0].token_ids)
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        expected = ids[0, len(prompt) :].tolist()
        assert got == expected
        assert len(set(got)) > 3  # a non-degenerate continuation, so the comparison means something
