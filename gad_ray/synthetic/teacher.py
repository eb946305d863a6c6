"""The testbed's white-box teacher: the synthetic teacher as a causal LM on the student's tokenizer.

``synthetic:teacher`` (a model spec, :func:`gad_ray.models.loading.resolve_model_path`) is the
pre-trained ``synthetic:student`` fine-tuned for :data:`STEPS` AdamW steps on the synthetic
teacher's own responses (``teacher_answer``: its frame ``Answer: ... .`` and its preferences among
valid answers, sampled at T=1), on every family. It is the frozen teacher of on-policy
distillation (docs/algorithms.md §7) in CPU tests and the demo: its log-probs score the student's
samples. Built once, with a fixed seed, into the model cache (under a minute on 2 cores once the
student is cached).

``python -m gad_ray.synthetic.teacher --out DIR [--base PATH]`` builds one into DIR from any base
with the tiny tokenizer.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gad_ray.models.cache import default_cache_dir
from gad_ray.synthetic.student import (
    MAX_LEN,
    MIN_LEN,
    PRETRAIN_TASKS,
    cached_student,
    lr_at,
    prompt_ids,
    sft_batch,
)
from gad_ray.synthetic.tasks import make_prompt, teacher_answer

TEACHER_VERSION = "v1"  # bump when what build_teacher makes changes, so stale caches are rebuilt
STEPS, BATCH, LR, WARMUP = 40, 32, 1e-3, 5


def teacher_batch(
    tok, rng: random.Random, n: int, tasks: Sequence[str] = PRETRAIN_TASKS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask) of ``n`` prompts with the synthetic teacher's framed
    answers (sampled at T=1), right-padded; labels are -100 except on the answer and its EOS."""
    rows = []
    for _ in range(n):
        prompt = make_prompt(rng.choice(tasks), rng, rng.randint(MIN_LEN, MAX_LEN))
        p = prompt_ids(tok, prompt)
        a = tok(teacher_answer(prompt, rng, 1.0, "framed"), add_special_tokens=False)["input_ids"]
        rows.append((p + a + [tok.eos_token_id], len(p)))
    return sft_batch(rows, tok.pad_token_id)


def build_teacher(
    out_dir: str | Path,
    base: str | Path,
    seed: int = 0,
    steps: int = STEPS,
    batch: int = BATCH,
    lr: float = LR,
    log: Callable[[str], None] = print,
) -> Path:
    """Fine-tune the model at ``base`` on the synthetic teacher's responses; save it (model,
    tokenizer) with ``teacher.json`` (the base, the steps, the last loss, the build time)."""
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(base))  # the student's, built with it
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(f"teacher-{seed}")
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(WARMUP, steps))
        ids, labels, mask = teacher_batch(tok, rng, batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0:
            log(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {
        "version": TEACHER_VERSION,
        "base": str(base),
        "seed": seed,
        "steps": steps,
        "final_loss": loss.item(),
        "build_s": time.time() - t0,
    }
    (out / "teacher.json").write_text(json.dumps(info, indent=1))
    log(f"fine-tuned in {info['build_s']:.0f} s; last loss {info['final_loss']:.3f}")
    return out


def cached_teacher(root: Path) -> Path:
    """The directory of ``synthetic:teacher`` under ``root``, built there first from
    ``synthetic:student`` when it is missing (once: concurrent callers wait on a file lock)."""
    final = root / f"synthetic-teacher-{TEACHER_VERSION}"
    if final.is_dir():
        return final
    base = cached_student("student", root)
    with open(root / ".synthetic-teacher.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():
            log = lambda msg: print(f"[synthetic:teacher] {msg}", file=sys.stderr, flush=True)  # noqa: E731
            log(f"fine-tuning the testbed's white-box teacher into {final} (once)")
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
            tmp.chmod(0o755)
            try:
                build_teacher(tmp, base, log=log)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the synthetic testbed's white-box teacher.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--base", default="synthetic:student", help="synthetic:student or a directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--lr", type=float, default=LR)
    args = ap.parse_args(argv)
    student = args.base == "synthetic:student"
    base = cached_student("student", default_cache_dir()) if student else Path(args.base)
    build_teacher(args.out, base, args.seed, args.steps, args.batch, args.lr)


if __name__ == "__main__":
    main()
