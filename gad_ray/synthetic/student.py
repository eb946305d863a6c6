"""The testbed's competent student: a small Qwen2 pre-trained on the synthetic task families.

``synthetic:student`` (a model spec, :func:`gad_ray.models.loading.resolve_model_path`) is this
model, built once with a fixed seed into the model cache and loaded through ``from_pretrained``
like any checkpoint. It is the analogue of the paper's instruction-tuned student (docs/quality.md):
pre-trained on every family of :data:`PRETRAIN_TASKS` in its *own* style (the bare answer, and
on the multi-modal families a uniform choice among the valid answers), so before distillation it
already answers every family, in-domain and held-out, but it has never seen the teacher's frame
(``Answer: ...``) nor the teacher's preferences among valid answers.

``python -m gad_ray.synthetic.student --out DIR`` builds one into DIR and prints its competence.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

from gad_ray.data.tokenize import encode_prompt
from gad_ray.models.errors import ModelLoadError
from gad_ray.models.tiny import build_tokenizer
from gad_ray.synthetic.tasks import answer_distribution, check, make_prompt, styled

# The testbed (docs/quality.md): the student is pre-trained on every family; distillation uses the
# in-domain ones; the held-out ones are scored out of domain.
IN_DOMAIN_TASKS = ("copy", "upper", "reverse", "fruit", "synonym")
HELD_OUT_TASKS = ("last", "count", "animal")
PRETRAIN_TASKS = IN_DOMAIN_TASKS + HELD_OUT_TASKS
# sampling weight of a family in pre-training: the word-transforming ones take longest to learn
PRETRAIN_WEIGHTS = {"copy": 3, "upper": 3, "reverse": 3}
MIN_LEN, MAX_LEN = 1, 3  # words per prompt, pre-training and distillation alike
# The student's formats in pre-training: mostly the bare answer (its greedy style), sometimes
# one of four frames; never the teacher's ``Answer: ... .`` (tasks.STYLES)
STUDENT_STYLES = {"plain": 0.6, "result": 0.1, "sure": 0.1, "it_is": 0.1, "here": 0.1}

STUDENT_VERSION = "v2"  # bump when what build_student makes changes, so stale caches are rebuilt
# hidden, layers, heads, kv heads, MLP width (head_dim 64: vLLM on CPU needs >= 32)
SHAPE = (256, 4, 4, 2, 1024)
STEPS, BATCH, LR, WARMUP = 400, 64, 3e-3, 30
COMPETENCE_N = 64  # prompts per family in the competence check
MAX_NEW_TOKENS = 32


def student_answer(prompt: str, rng: random.Random) -> str:
    """The student's own answer: on a multi-modal family a uniform choice among the valid
    answers; bare (its default style) or, less often, in one of its other formats."""
    _, dist = answer_distribution(prompt)
    style = rng.choices(list(STUDENT_STYLES), list(STUDENT_STYLES.values()))[0]
    return styled(rng.choice(sorted(dist)), style)


def model_config(tok, shape: tuple[int, int, int, int, int] = SHAPE) -> Qwen2Config:
    hidden, layers, heads, kv_heads, inter = shape
    return Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate_size=inter,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.02,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )


def prompt_ids(tok, prompt: str) -> list[int]:
    """The chat-template ids of a one-message prompt (as the driver tokenizes it)."""
    return encode_prompt(tok, [{"role": "user", "content": prompt}])


def make_batch(
    tok, rng: random.Random, n: int, tasks: Sequence[str] = PRETRAIN_TASKS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask) of ``n`` random examples, right-padded; labels are
    -100 except on the answer and its EOS (the SFT loss of docs/algorithms.md §2.5)."""
    rows = []
    weights = [PRETRAIN_WEIGHTS.get(t, 1) for t in tasks]
    for _ in range(n):
        task = rng.choices(tasks, weights)[0]
        prompt = make_prompt(task, rng, rng.randint(MIN_LEN, MAX_LEN))
        p = prompt_ids(tok, prompt)
        a = tok(student_answer(prompt, rng), add_special_tokens=False)["input_ids"]
        rows.append((p + a + [tok.eos_token_id], len(p)))
    return sft_batch(rows, tok.pad_token_id)


@torch.no_grad()
def greedy_answers(model, tok, prompts: Sequence[str], batch: int = 64) -> list[str]:
    """Greedy answers of ``model`` (HF generate, left-padded batches)."""
    out: list[str] = []
    was_training = model.training
    model.eval()
    for i in range(0, len(prompts), batch):
        chunk = [prompt_ids(tok, p) for p in prompts[i : i + batch]]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        out += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return out


def competence(
    model, tok, tasks: Sequence[str] = PRETRAIN_TASKS, n: int = COMPETENCE_N, seed: int = 12345
) -> dict[str, float]:
    """Greedy accuracy per family on ``n`` fresh prompts each (lengths MIN_LEN..MAX_LEN)."""
    rng = random.Random(f"competence-{seed}")
    prompts = {
        t: [make_prompt(t, rng, rng.randint(MIN_LEN, MAX_LEN)) for _ in range(n)] for t in tasks
    }
    flat = [p for t in tasks for p in prompts[t]]
    answers = iter(greedy_answers(model, tok, flat))
    return {t: sum(check(p, next(answers)).correct for p in prompts[t]) / n for t in tasks}


def testbed_scores(model, tok, n: int = 32, seed: int = 0) -> dict[str, dict[str, float]]:
    """The benchmark's greedy metrics (docs/quality.md) on ``n`` fresh prompts per family:
    {"id" | "ood": {"score": correct and framed, "accuracy": correct, "framed": framed}}."""
    rng = random.Random(f"testbed-{seed}")
    out = {}
    for split, tasks in (("id", IN_DOMAIN_TASKS), ("ood", HELD_OUT_TASKS)):
        prompts = [
            make_prompt(t, rng, rng.randint(MIN_LEN, MAX_LEN)) for t in tasks for _ in range(n)
        ]
        verdicts = [
            check(p, a) for p, a in zip(prompts, greedy_answers(model, tok, prompts), strict=True)
        ]
        out[split] = {
            "score": sum(v.correct and v.framed for v in verdicts) / len(verdicts),
            "accuracy": sum(v.correct for v in verdicts) / len(verdicts),
            "framed": sum(v.framed for v in verdicts) / len(verdicts),
        }
    return out


def sft_batch(
    rows: list[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels, mask) of (token ids, prompt length) rows, right-padded; labels are -100
    except on the answer and its EOS."""
    n, width = len(rows), max(len(ids) for ids, _ in rows)
    ids = torch.full((n, width), pad_id)
    labels = torch.full((n, width), -100)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (row, plen) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, plen : len(row)] = torch.tensor(row[plen:])
        mask[i, : len(row)] = 1
    return ids, labels, mask


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(
    seed: int = 0,
    steps: int = STEPS,
    batch: int = BATCH,
    lr: float = LR,
    shape: tuple[int, int, int, int, int] = SHAPE,
    log: Callable[[str], None] = print,
    eval_every: int = 0,
):
    """(model, tokenizer): a fresh student pre-trained for ``steps`` AdamW steps."""
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(tok, shape), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(f"pretrain-{seed}")
    model.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, WARMUP)
        ids, labels, mask = make_batch(tok, rng, batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step == 0:
            log(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
        if eval_every and (step + 1) % eval_every == 0:
            acc = competence(model, tok, n=32)
            log("  " + " ".join(f"{t} {a:.2f}" for t, a in acc.items()))
    return model, tok


def build_student(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = STEPS,
    log: Callable[[str], None] = print,
    competence_n: int = COMPETENCE_N,
) -> Path:
    """Pre-train the student and save it (``save_pretrained`` + tokenizer) with a
    ``competence.json`` holding its greedy accuracy per family and the build time."""
    t0 = time.time()
    model, tok = pretrain(seed=seed, steps=steps, log=log)
    seconds = time.time() - t0
    acc = competence(model, tok, n=competence_n)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"version": STUDENT_VERSION, "seed": seed, "pretrain_s": seconds, "competence": acc}
    (out / "competence.json").write_text(json.dumps(info, indent=1))
    log(
        f"pre-trained in {seconds:.0f} s; greedy accuracy: "
        + ", ".join(f"{t} {a:.2f}" for t, a in acc.items())
    )
    return out


def read_competence(path: str | Path) -> dict:
    """The ``competence.json`` a build wrote beside the model ({} when there is none)."""
    f = Path(path) / "competence.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def cached_student(name: str, root: Path) -> Path:
    """The directory of ``synthetic:<name>`` under ``root``, pre-trained there first when it is
    missing (once: concurrent callers wait on a file lock and reuse the first one's build)."""
    if name != "student":
        raise ModelLoadError(
            f"model spec 'synthetic:{name}': unknown; the synthetic models are 'synthetic:student' and "
            "'synthetic:teacher'"
        )
    final = root / f"synthetic-student-{STUDENT_VERSION}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".synthetic-student.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():
            log = lambda msg: print(f"[synthetic:student] {msg}", file=sys.stderr, flush=True)  # noqa: E731
            log(f"pre-training the testbed's student into {final} (once; a few CPU minutes)")
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
            tmp.chmod(0o755)
            try:
                build_student(tmp, log=log)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Pre-train the synthetic testbed's student.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--shape", default=",".join(map(str, SHAPE)))
    ap.add_argument("--eval-every", type=int, default=0)
    args = ap.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    t0 = time.time()
    model, tok = pretrain(
        args.seed, args.steps, args.batch, args.lr, shape, eval_every=args.eval_every
    )
    print(f"trained in {time.time() - t0:.0f} s")
    acc = competence(model, tok)
    print(" ".join(f"{t} {a:.2f}" for t, a in acc.items()))
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)


if __name__ == "__main__":
    main()
