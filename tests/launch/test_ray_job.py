"""`ray job submit` to a local `ray start --head` cluster runs a tiny gad-train job to completion."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gad_ray.driver.metrics import read_metrics
from tests.driver.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_a_tiny_job(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_ADDRESS": ""}
    port, dash = _free_port(), _free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=8", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--temp-dir={tmp_path / 'ray'}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    run_dir = tmp_path / "run"
    try:
        submit = [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}",
                  "--runtime-env", "launch/runtime_env.yaml", "--",
                  "gad-train", *tiny_overrides(run_dir, "algorithm.gad.steps=1",
                                               "cluster.log_to_driver=false")]
        deadline = time.time() + 120
        while True:  # the job server comes up a few seconds after the head
            out = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=900)
            if out.returncode == 0 or time.time() > deadline or "succeeded" in out.stdout:
                break
            if "Failed to connect" not in out.stdout + out.stderr:
                break
            time.sleep(3)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]
    assert [r["stage"] for r in steps] == ["warmup", "warmup", "gad"]
    assert (run_dir / "final" / "config.json").is_file()
