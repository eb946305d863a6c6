"""Weight sync per update, full weights vs a LoRA adapter, into vLLM (and HF) rollout workers.

A full sync sends every weight of the student (``send_weights`` of the state dict; vLLM reloads
them layer by layer); an adapter sync sends only G's LoRA adapter (peft's tensors and config;
the worker keeps its base and serves the adapter as a new version). Same transport (object
store), same buckets, best of three interleaved runs (the machine may be shared). The last rows
give the bytes of one sync for Qwen2.5-7B in bf16 (computed, not measured).

Run: ``python bench/lora_sync.py [--model tiny:small --rank 16]`` (~1-2 min on CPU).
"""

import argparse
import json
import os
import time

import ray
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from gad_ray.config.schema import LoraSpec, RolloutConfig
from gad_ray.models.loading import VLLM_CPU_ENV, load_causal_lm, resolve_model_path
from gad_ray.models.shapes import SHIPPED_SHAPES
from gad_ray.plan.lora import adapter_params
from gad_ray.rollout import send_weights
from gad_ray.rollout.hf_worker import HFRolloutWorker
from gad_ray.rollout.vllm_worker import RolloutWorker


def adapter(path: str, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A rank-``rank`` adapter on every linear layer with random B (peft's names), its config."""
    model = get_peft_model(
        load_causal_lm(path), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    config = json.loads(json.dumps(model.peft_config["default"].to_dict(), default=sorted))
    config["base_model_name_or_path"] = path
    return get_peft_model_state_dict(model), config


def best_of(runs: int, fn) -> tuple[float, dict]:
    best = None
    for _ in range(runs):
        t0 = time.perf_counter()
        stats = fn()
        seconds = time.perf_counter() - t0
        if best is None or seconds < best[0]:
            best = (seconds, stats)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny:small")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bucket-mb", type=int, default=16)
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    ray.init(num_cpus=max(2, os.cpu_count() or 1) + 1, include_dashboard=False)
    full = load_causal_lm(path).state_dict()
    tensors, config = adapter(path, args.rank)
    bucket = args.bucket_mb * 2**20
    rcfg = RolloutConfig(max_num_seqs=32, kv_cache_memory_bytes=64 * 2**20)
    env = {"env_vars": VLLM_CPU_ENV}
    rows = []
    for backend, cls in (("vLLM", RolloutWorker), ("HF", HFRolloutWorker)):
        actor = ray.remote(cls).options(num_cpus=1, runtime_env=env)
        plain = actor.remote(path, rcfg, "auto", 256, 0)
        lora = actor.remote(path, rcfg, "auto", 256, 0, args.rank)
        ray.get([plain.health.remote(), lora.health.remote()])
        sends = {
            "full weights": lambda w=plain: send_weights(full.items(), [w], bucket),
            f"LoRA adapter, rank {args.rank}": lambda w=lora: send_weights(
                tensors.items(), [w], bucket, adapter=config
            ),
        }
        for fn in sends.values():  # warm-up
            fn()
        best: dict[str, tuple[float, dict]] = {}
        for _ in range(3):
            for what, fn in sends.items():
                seconds, stats = best_of(1, fn)
                if what not in best or seconds < best[what][0]:
                    best[what] = (seconds, stats)
        for what, (seconds, stats) in best.items():
            rows.append((f"{what}, 1 {backend} worker", stats["bytes"], seconds))
        ray.kill(plain)
        ray.kill(lora)
    ray.shutdown()

    print(f"\n### Weight sync per update: {args.model}, CPU ({os.cpu_count()} cores)\n")
    print("| what | bytes per sync | seconds per sync |\n|---|---:|---:|")
    for what, nbytes, seconds in rows:
        print(f"| {what} | {nbytes / 1e6:,.2f} MB | {seconds * 1e3:,.0f} ms |")
    shape = SHIPPED_SHAPES["Qwen/Qwen2.5-7B-Instruct"]
    for rank in (32, 64):
        a = adapter_params(shape, LoraSpec(rank=rank))
        print(f"| Qwen2.5-7B, LoRA rank {rank} (bf16, computed) | {2 * a / 1e6:,.0f} MB | - |")
    print(f"| Qwen2.5-7B, full weights (bf16, computed) | {2 * shape.params / 1e6:,.0f} MB | - |")


if __name__ == "__main__":
    main()
