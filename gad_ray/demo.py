"""``make demo``: distil the synthetic teacher into the testbed's pre-trained student on CPU.

Uses the quality testbed (docs/quality.md, ``experiment=quality_cpu``): the competent
``synthetic:student`` (pre-trained once into the model cache on first use, a few CPU minutes),
and the synthetic OpenAI-compatible teacher on localhost answering in its own style
(``Answer: <answer>.``). The teacher's responses come through the real fetcher and ``openai``
client; the warmup (one epoch) and the GAD stage run on a local Ray. Then it prints, in the
benchmark's terms, the student before and after: the share of greedy answers that are correct
in the teacher's style (score), correct in any style (accuracy) and in the teacher's style,
in domain (the distilled families) and out of domain (families it never saw distilled).
Extra arguments are Hydra overrides.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import time

from transformers import AutoModelForCausalLM

from gad_ray.driver.driver import train
from gad_ray.hydra_app import compose
from gad_ray.models.loading import load_tokenizer, resolve_model_path
from gad_ray.synthetic.server import start_server_thread
from gad_ray.synthetic.student import testbed_scores

KEY_ENV = "GAD_DEMO_TEACHER_KEY"


def default_run_dir(overrides: list[str]) -> str:
    """``outputs/demo``, or ``outputs/demo-<hash>`` with overrides: a rerun resumes only the
    run of the same overrides, never one that trained something else."""
    if not overrides:
        return "outputs/demo"
    return f"outputs/demo-{hashlib.sha256(' '.join(overrides).encode()).hexdigest()[:8]}"


def print_scores(rows: dict[str, dict[str, dict[str, float]]]) -> None:
    print("\nthe student's greedy answers on held-out prompts (docs/quality.md):")
    print(
        f"  {'':<8}{'ID score':>9}{'ID acc':>8}{'ID style':>9}{'OOD score':>10}{'OOD acc':>8}{'OOD style':>10}"
    )
    for label, s in rows.items():
        cells = [s[sp][k] for sp in ("id", "ood") for k in ("score", "accuracy", "framed")]
        print(
            f"  {label:<8}"
            + "".join(f"{c:>{w}.2f}" for c, w in zip(cells, (9, 8, 9, 10, 8, 10), strict=True))
        )
    print(
        "  score: correct and in the teacher's style; acc: correct in any style; style: in the\n"
        "  teacher's style. ID: the distilled families; OOD: last, count, animal (pre-training only)."
    )


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(overrides):
        print(f"usage: python -m gad_ray.demo [key=value ...]  (or: make demo)\n\n{__doc__}")
        print("example: python -m gad_ray.demo algorithm.gad.steps=40  # outputs/demo-<hash>")
        return
    os.environ[KEY_ENV] = secrets.token_hex(16)  # the demo's teacher requires a key, like an API
    t0 = time.time()
    with start_server_thread(api_key=os.environ[KEY_ENV], latency_ms=20, style="framed") as server:
        print(f"synthetic teacher listening on {server.base_url}")
        cfg = compose(
            [
                "experiment=quality_cpu",
                "teacher=api",
                f"teacher.api.base_url={server.base_url}",
                "teacher.api.model=synthetic-teacher",
                f"teacher.api.api_key_env={KEY_ENV}",
                "teacher.api.max_tokens=48",
                "cluster.log_to_driver=false",  # keep vLLM's and transformers' logs out of the demo
                *overrides,
            ],
            run_dir=next(
                (o.split("=", 1)[1] for o in overrides if o.startswith("trainer.run_dir=")),
                default_run_dir(overrides),
            ),
        )
        run_dir = train(cfg)
        served = server.stats()["total_requests"]
    print(f"\nteacher requests served: {served}; wall time {time.time() - t0:.0f} s")
    student = resolve_model_path(cfg.model.student.path)
    tok = load_tokenizer(student)
    rows = {
        label: testbed_scores(AutoModelForCausalLM.from_pretrained(path), tok)
        for label, path in (("before", student), ("after", run_dir / "final"))
    }
    print_scores(rows)


if __name__ == "__main__":
    main()
