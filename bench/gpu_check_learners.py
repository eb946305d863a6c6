"""Part (a) of ``bench/gpu_check.py`` (its docstring says what and how): SFT and GRPO steps of
the generator group and BT steps of the discriminator group; whether one step moves the
weights, step time, tokens/s, and each step's peak memory against the plan's figure
(:mod:`gad_ray.plan.measure`). A module beside the script (``bench/`` is its directory)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch


# -- set-up shared with part (b) ------------------------------------------------------------------
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

    from gad_ray.data.batch import concat_batches
    from gad_ray.discriminator import DiscriminatorGroup
    from gad_ray.driver.setup import cpus_per_actor
    from gad_ray.hydra_app import compose
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
        batches = {"SFT": student, "GRPO": student, "BT": concat_batches(teacher, student)}
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
            memory = plan_vs_measured(cfg, group, step, name, batches[name], not args.tiny)
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
                    memory=memory,
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


def plan_vs_measured(cfg: Any, group: Any, step: Any, name: str, batch: Any, cuda: bool) -> dict:
    """One more ``step`` with each rank measuring its peak of live tensor bytes
    (:mod:`gad_ray.plan.measure`: ``torch.cuda.max_memory_allocated`` on GPU, the profiler's
    allocator events on CPU), and the plan's figure for rank 0's micro batches."""
    from gad_ray.plan.learners import learner_step, shapes_of
    from gad_ray.plan.measure import start_peak, stop_peak

    mbs = shapes_of(batch, group.plan(batch)[0])
    group.run_all("__ray_call__", start_peak)
    step()
    measured = max(group.run_all("__ray_call__", stop_peak))
    kind = {"SFT": "sft", "GRPO": "grpo", "BT": None}[name]
    planned = learner_step(cfg, "D" if name == "BT" else "G", mbs, cuda, kind)
    shapes = ", ".join(f"{mb.rows:g}x{mb.length}" for mb in mbs)
    return dict(plan=planned.total, moment=planned.name, measured=measured, shapes=shapes)


def memory_table(results: list[dict]) -> tuple[str, bool]:
    """Plan vs measured peak per step, and whether measured <= plan <= 1.25 x measured."""
    lines = [
        "| step | role | micro-batches (rank 0, rows x length) | plan GiB (largest moment) "
        "| measured GiB | plan / measured |",
        "|---|---|---|---:|---:|---:|",
    ]
    ok = True
    for r in results:
        m = r["memory"]
        ratio = m["plan"] / m["measured"]
        ok &= 1.0 <= ratio <= 1.25
        lines.append(
            f"| {r['step']} | {r['role']} | {m['shapes']} | {m['plan'] / 2**30:.3f} "
            f"({m['moment']}) | {m['measured'] / 2**30:.3f} | {ratio:.3f} |"
        )
    return "\n".join(lines), ok
