"""Learner throughput benchmark.

Default (CPU): tokens/s of SFT and GRPO steps of the generator learner and BT steps of the
discriminator learner, per backend (fsdp, deepspeed) and rank count (1, 2), on the ``tiny:small``
model, printed as a Markdown table. Run: ``python bench/learner.py`` (a few minutes on 2 cores).

``--gpu``: model FLOPs utilisation of one forward+backward+AdamW step of a Qwen2.5-0.5B-shaped
random model in bf16 with plain torch on one GPU (imports nothing from ray/vllm/deepspeed):
``MFU = 6 * params * tokens/s / peak`` with ``--peak-flops`` (default: H100 dense bf16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

QWEN25_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)


# -- CPU: the learner groups ----------------------------------------------------------------------
def _config(backend: str, ranks: int, rows: int) -> object:
    from gad_ray.validate import validate_config

    raw = {
        "model": {"student": {"path": "tiny:small"}},
        "algorithm": {
            "name": "gad",
            "grpo": {"n_samples": 2},
            "generator_optim": {"lr": 1e-5},
            "discriminator_optim": {"lr": 1e-5},
        },
        "data": {"train_path": "unused.jsonl", "prompts_per_step": rows, "max_prompt_length": 256},
        "learner": {
            "backend": backend,
            "zero_stage": 3,
            "generator_ranks": ranks,
            "discriminator_ranks": ranks,
            "micro_batch_size": max(1, rows // ranks // 2),
        },
    }
    return validate_config(raw, check_model_context=False)


def _batch(seed: int, rows: int, prompt: int, response: int) -> object:
    from gad_ray.data.batch import make_batch

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 2000, (n,), generator=g).tolist()  # noqa: E731
    return make_batch([ids(prompt) for _ in range(rows)], [ids(response) for _ in range(rows)], 0)


def _median_tps(fn, steps: int) -> float:
    fn()  # warm-up step
    return statistics.median(fn()["tokens_per_s"] for _ in range(steps))


def _bench_groups(cfg: object, cpus: int, steps: int, rows: int, lens: tuple[int, int]) -> dict:
    """SFT and GRPO tokens/s of a generator group, BT tokens/s of a discriminator group."""
    from gad_ray.discriminator import DiscriminatorGroup
    from gad_ray.learner import GeneratorGroup

    batch = _batch(0, rows, *lens)
    adv = torch.randn(rows, generator=torch.Generator().manual_seed(1))
    teacher, pairs = _batch(2, rows // 2, *lens), torch.arange(rows) // 2
    out = {}
    gen = GeneratorGroup(cfg, cpus_per_rank=cpus)
    try:
        out["sft"] = _median_tps(lambda: gen.train_sft(batch), steps)
        out["grpo"] = _median_tps(
            lambda: gen.train_grpo(batch, adv, temperature=cfg.algorithm.grpo.temperature), steps
        )
    finally:
        gen.shutdown()
    disc = DiscriminatorGroup(cfg, cpus_per_rank=cpus)
    try:
        out["bt"] = _median_tps(lambda: disc.train_bt(teacher, batch, pairs), steps)
    finally:
        disc.shutdown()
    return out


def bench_cpu(args: argparse.Namespace) -> list[dict]:
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        for backend in args.backends:
            for ranks in args.ranks:
                cfg = _config(backend, ranks, args.rows)
                cpus = max(1, args.cpus // ranks)
                lens = (args.prompt_len, args.response_len)
                row = {"backend": backend, "ranks": ranks}
                row.update(_bench_groups(cfg, cpus, args.steps, args.rows, lens))
                print(row, flush=True)
                results.append(row)
    finally:
        ray.shutdown()
    return results


def table_cpu(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"tokens/s on `tiny:small`, {args.rows} rows x ({args.prompt_len} prompt + "
        f"{args.response_len} response) tokens, median of {args.steps} steps, {args.cpus} CPUs",
        "",
        "| backend | ranks | SFT tok/s | GRPO tok/s | BT tok/s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['ranks']} | {r['sft']:.0f} | {r['grpo']:.0f} | {r['bt']:.0f} |"
        )
    return "\n".join(lines)


# -- GPU: plain torch MFU -------------------------------------------------------------------------
def bench_gpu(args: argparse.Namespace) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    device = torch.device("cuda")
    config = Qwen2Config(**QWEN25_05B, attn_implementation="sdpa", use_cache=False)
    model = Qwen2ForCausalLM(config).to(device, torch.bfloat16).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (args.gpu_batch, args.gpu_seq), device=device)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.gpu_warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = args.gpu_batch * args.gpu_seq / seconds
    mfu = 6 * params * tokens_per_s / args.peak_flops
    return "\n".join(
        [
            f"Qwen2.5-0.5B-shaped random model, bf16 params + AdamW, plain torch, "
            f"{torch.cuda.get_device_name()}, batch {args.gpu_batch} x {args.gpu_seq} tokens",
            "",
            f"| params | step s | tokens/s | MFU (6N, peak {args.peak_flops:.3g} FLOP/s) "
            "| peak mem GiB |",
            "|---|---|---|---|---|",
            f"| {params / 1e6:.0f}M | {seconds:.3f} | {tokens_per_s:.0f} | {100 * mfu:.1f}% | "
            f"{torch.cuda.max_memory_allocated() / 2**30:.1f} |",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="plain-torch MFU on one GPU instead")
    p.add_argument("--steps", type=int, default=2, help="measured steps (after one warm-up)")
    p.add_argument("--backends", nargs="+", default=["fsdp", "deepspeed"])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--rows", type=int, default=8, help="student rows per step (even)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--gpu-batch", type=int, default=8)
    p.add_argument("--gpu-seq", type=int, default=2048)
    p.add_argument("--gpu-warmup", type=int, default=3)
    p.add_argument("--peak-flops", type=float, default=989e12, help="peak dense bf16 FLOP/s")
    args = p.parse_args(argv)
    if args.gpu:
        print(bench_gpu(args))
    else:
        print(table_cpu(bench_cpu(args), args))


if __name__ == "__main__":
    main()
