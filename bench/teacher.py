"""Teacher fetcher throughput vs the Little's-law limit (concurrency / server latency).

Starts ``gad-teacher-server`` in a subprocess (so it does not share the GIL with the client),
fetches distinct synthetic prompts at several concurrency levels, with and without 10% injected
faults (2% each of 429, 500, hang, dropped connection, malformed JSON), and prints a Markdown
table. Usage: ``python bench/teacher.py [--latency-ms 50] [--levels 1,4,16,64]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from gad_ray.config.schema import TeacherAPIConfig
from gad_ray.synthetic.tasks import make_dataset
from gad_ray.teacher.cache import ResponseCache
from gad_ray.teacher.fetcher import Fetcher

FAULTS = {"429": 0.02, "500": 0.02, "timeout": 0.02, "drop": 0.02, "malformed": 0.02}
KEY_ENV = "GAD_RAY_BENCH_KEY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(latency_ms: float, faults: dict[str, float]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gad_ray.synthetic.server", "--port", str(port)]
    cmd += ["--latency-ms", str(latency_ms), "--hang-s", "2", "--retry-after-s", "0.05"]
    cmd += [f"--p-{name}={p}" for name, p in faults.items()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{root}/v1/models", timeout=1).close()
            return proc, root
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"gad-teacher-server did not start on port {port}")


def server_stats(root: str, reset: bool = False) -> dict:
    req = urllib.request.Request(f"{root}/stats/reset", method="POST") if reset else f"{root}/stats"
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def run_level(root: str, prompts: list[str], concurrency: int, cache_dir: str) -> dict:
    api = TeacherAPIConfig(
        base_url=f"{root}/v1",
        model="synthetic-teacher",
        api_key_env=KEY_ENV,
        concurrency=concurrency,
        max_tokens=32,
        timeout_s=0.25,
        max_retries=20,
        backoff_base_s=0.02,
        backoff_max_s=0.2,
    )
    cache = ResponseCache(Path(cache_dir) / f"c{concurrency}-{time.monotonic_ns()}.sqlite")

    async def go() -> tuple[float, list]:
        async with Fetcher(api, cache) as f:
            t0 = time.perf_counter()
            results = await f.fetch_many(prompts)
            return time.perf_counter() - t0, results

    server_stats(root, reset=True)
    wall, results = asyncio.run(go())
    cache.close()
    ok = sum(r.status == "ok" for r in results)
    return {"ok": ok, "wall": wall, "calls": server_stats(root)["total_requests"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--levels", default="1,4,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--per-slot", type=int, default=12, help="requests per concurrency slot")
    args = ap.parse_args(argv)
    os.environ.setdefault(KEY_ENV, "sk-bench-not-a-real-key")
    levels = [int(c) for c in args.levels.split(",")]
    rows = make_dataset(
        40 * max(levels) * args.per_slot, 11, min_len=3, max_len=9, with_teacher=False
    )
    unique = list(dict.fromkeys(r["content"][0]["content"] for r in rows))
    print(f"server latency {args.latency_ms:g} ms; faults: {FAULTS} (10% in all)\n")
    print(
        "| concurrency | faults | prompts | server calls | wall s | req/s | Little limit | ratio |"
    )
    print("|---:|:---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for faults in ({}, FAULTS):
            proc, root = start_server(args.latency_ms, faults)
            try:
                for c in levels:
                    n = max(40, c * args.per_slot)
                    if n > len(unique):
                        raise SystemExit(f"only {len(unique)} distinct prompts for {n} requests")
                    r = run_level(root, unique[:n], c, tmp)
                    rate, limit = r["ok"] / r["wall"], c / (args.latency_ms / 1000.0)
                    print(
                        f"| {c} | {'10%' if faults else 'none'} | {r['ok']}/{n} | {r['calls']} "
                        f"| {r['wall']:.2f} | {rate:.1f} | {limit:.0f} | {rate / limit:.2f} |",
                        flush=True,
                    )
            finally:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
