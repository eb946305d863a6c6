"""``make demo``: distil the synthetic teacher into a ~15M-parameter student on CPU.

Builds the ``tiny:small`` student locally, starts the synthetic OpenAI-compatible teacher on
localhost, fetches its responses through the real fetcher and ``openai`` client, runs the
warmup and some GAD steps on a local Ray, and prints the student's synthetic task score
before warmup, after warmup and after GAD. Extra arguments are Hydra overrides.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import time

from gad_ray.config.hydra_app import compose
from gad_ray.driver.driver import train
from gad_ray.driver.metrics import read_metrics
from gad_ray.synthetic.server import start_server_thread

KEY_ENV = "GAD_DEMO_TEACHER_KEY"


def default_run_dir(overrides: list[str]) -> str:
    """``outputs/demo``, or ``outputs/demo-<hash>`` with overrides: a rerun resumes only the
    run of the same overrides, never one that trained something else."""
    if not overrides:
        return "outputs/demo"
    return f"outputs/demo-{hashlib.sha256(' '.join(overrides).encode()).hexdigest()[:8]}"


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(overrides):
        print(f"usage: python -m gad_ray.demo [key=value ...]  (or: make demo)\n\n{__doc__}")
        print("example: python -m gad_ray.demo algorithm.gad.steps=40  # outputs/demo-<hash>")
        return
    os.environ[KEY_ENV] = secrets.token_hex(16)  # the demo's teacher requires a key, like an API
    t0 = time.time()
    with start_server_thread(api_key=os.environ[KEY_ENV], latency_ms=20) as server:
        print(f"synthetic teacher listening on {server.base_url}")
        cfg = compose(
            [
                "experiment=tiny_cpu",
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
    evals = {r["event"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "event" in r}
    print(f"\nteacher requests served: {served}; wall time {time.time() - t0:.0f} s")
    print("\nsynthetic task accuracy of the student (greedy, held-out prompts):")
    for label in ("before_warmup", "after_warmup", "final"):
        if label in evals:
            tasks = {
                k.split("/", 1)[1]: v
                for k, v in evals[label].items()
                if k.startswith("eval_accuracy/")
            }
            per_task = "  ".join(f"{t} {v:.2f}" for t, v in sorted(tasks.items()))
            print(f"  {label:<14} {evals[label]['eval_accuracy']:.3f}   ({per_task})")


if __name__ == "__main__":
    main()
