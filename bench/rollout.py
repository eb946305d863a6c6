"""Rollout benchmark on the `small` tiny model (CPU or GPU), printed as a Markdown table.

- generation: tokens/s of a RolloutGroup (Ray actors) vs calling vLLM directly in this process
  on the same prompts and sampling settings (ratio = group / direct);
- weight sync: GB/s of `send_weights` (object store, ipc: shared memory on CPU / CUDA IPC on GPU,
  and gloo/NCCL broadcast) into vLLM workers and into HF workers (whose load is one copy per
  tensor: nearly the transport alone) vs a plain memcpy of the same bytes (ratio = sync / memcpy).

Run: `python bench/rollout.py [--prompts 32 --n 4 --max-tokens 32 --workers 1 2]` (~2-3 min on CPU).
"""

import argparse
import os
import random
import time

import ray
import torch

from gad_ray.config.schema import Config
from gad_ray.models.loading import (
    VLLM_CPU_ENV,
    VLLM_CPU_LLM_KWARGS,
    load_causal_lm,
    resolve_model_path,
)
from gad_ray.rollout import RolloutGroup, SamplingParams, send_weights

KV_BYTES = 256 * 2**20


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 2000) for _ in range(rng.randint(16, 128))] for _ in range(count)]


def timed(fn, repeats: int = 1, warmup=None) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls after one warm-up call (``warmup`` or ``fn``)."""
    (warmup or fn)()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def direct_vllm(path: str, prompts, n: int, max_tokens: int):
    """A function running ``vllm.LLM.generate`` in this process; returns generated tokens."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.update(VLLM_CPU_ENV)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = {"gpu_memory_utilization": 0.3} if on_gpu else dict(VLLM_CPU_LLM_KWARGS)
    if not on_gpu:  # as RolloutWorker does (vllm-cpu: seeded sampling breaks chunked prefill)
        kw |= {"enable_chunked_prefill": False, "max_num_batched_tokens": 4096}
    kw["kv_cache_memory_bytes"] = KV_BYTES
    llm = LLM(model=path, seed=0, max_model_len=512, max_num_seqs=256, **kw)
    params = [
        SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=i, logprobs=0)
        for i in range(len(prompts))
    ]
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def run(count: int | None = None) -> int:
        outs = llm.generate(inputs[:count], params[:count], use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    return run


def memcpy_gbps(state: dict[str, torch.Tensor]) -> float:
    """GB/s of copying every tensor's bytes into one preallocated buffer."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    buf = torch.empty(total, dtype=torch.uint8)

    def copy():
        off = 0
        for t in state.values():
            raw = t.reshape(-1).view(torch.uint8)
            buf[off : off + raw.numel()].copy_(raw)
            off += raw.numel()

    seconds, _ = timed(copy, repeats=10)
    return total / seconds / 1e9


def sync_rows(
    state: dict[str, torch.Tensor], group: RolloutGroup, bucket_mb: int, memcpy: float, label: str
) -> list[tuple[str, str, str]]:
    """A table row per weight-sync method into ``group``: GB/s and the ratio to ``memcpy``
    (methods interleaved after a warm-up each, best of three: the machine may be shared)."""
    methods = ("object_store", "ipc", "nccl" if torch.cuda.is_available() else "gloo")
    bucket, best = bucket_mb * 2**20, {}

    def sync(method):
        return send_weights(state.items(), group.workers, bucket, method)

    for method in methods:  # warm-up: the broadcast group, torch's shared-memory manager
        sync(method)
    for _ in range(3):
        for method in methods:
            seconds, stats = timed(lambda m=method: sync(m), warmup=lambda: None)
            if method not in best or seconds < best[method][0]:
                best[method] = (seconds, stats)
    rows = []
    for method, (seconds, stats) in best.items():
        gbps = stats["bytes"] / seconds / 1e9
        rows.append(
            (
                f"send_weights {method}, {label}, {stats['buckets']} buckets",
                f"{gbps:.2f} GB/s ({seconds * 1e3:.0f} ms)",
                f"{gbps / memcpy:.2f}",
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny:small")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bucket-mb", type=int, default=16)
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    prompts = make_prompts(args.prompts)
    on_gpu = torch.cuda.is_available()

    run_direct = direct_vllm(path, prompts, args.n, args.max_tokens)
    rows = []

    ray.init(num_cpus=max(max(args.workers), os.cpu_count() or 1) + 1, include_dashboard=False)
    state = load_causal_lm(path).state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    memcpy = memcpy_gbps(state)
    sync_table = []
    for workers in args.workers:
        cfg = Config(
            model={"student": {"path": path, "max_context": 512}},
            algorithm={"name": "seqkd"},
            data={"train_path": "unused.jsonl"},
            rollout={
                "num_workers": workers,
                "max_num_seqs": 256,
                "kv_cache_memory_bytes": KV_BYTES,
            },
            cluster={"gpus_per_node": 1 if on_gpu else 0},
        )
        cpus = max(1, (os.cpu_count() or 1) // workers)  # a worker's threads = its Ray CPUs
        group = RolloutGroup(cfg, path, num_cpus_per_worker=cpus)

        def run(group=group, count=None):
            return group.generate(
                prompts[:count], SamplingParams(args.n, 1.0, 1.0, args.max_tokens), seed=0
            )

        run(count=2 * workers)  # warm-up
        run_direct(2)
        best_direct = best_group = 0.0
        for _ in range(2):  # interleaved, best of two: the machine may be shared
            seconds, tokens = timed(run_direct, repeats=1, warmup=lambda: None)
            best_direct = max(best_direct, tokens / seconds)
            seconds, samples = timed(run, repeats=1, warmup=lambda: None)
            best_group = max(best_group, sum(s.length for s in samples) / seconds)
        rows.append(
            (
                f"vLLM direct (in-process), run beside {workers} worker(s)",
                f"{best_direct:,.0f} tok/s",
                "1.00",
            )
        )
        threads = [info["torch_threads"] for info in group.info]
        rows.append(
            (
                f"RolloutGroup, {workers} worker(s), torch threads {threads}",
                f"{best_group:,.0f} tok/s",
                f"{best_group / best_direct:.2f}",
            )
        )
        sync_table += sync_rows(state, group, args.bucket_mb, memcpy, f"{workers} vLLM worker(s)")
        group.shutdown()
        # HF workers load a bucket with one copy per tensor: the transport alone, nearly
        cfg.rollout.backend = "hf"
        group = RolloutGroup(cfg, path, num_cpus_per_worker=cpus)
        sync_table += sync_rows(state, group, args.bucket_mb, memcpy, f"{workers} HF worker(s)")
        group.shutdown()
    ray.shutdown()

    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"\n### Rollout benchmark: {args.model}, {device}\n")
    print(
        f"{args.prompts} prompts (16-128 tokens) x n={args.n}, max_tokens={args.max_tokens}; "
        f"weights {nbytes / 1e6:.1f} MB, buckets of {args.bucket_mb} MiB\n"
    )
    print("| what | throughput | ratio |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"| memcpy of the same bytes | {memcpy:.2f} GB/s | 1.00 |")
    for row in sync_table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
