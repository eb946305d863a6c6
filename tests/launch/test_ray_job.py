"""`ray job submit` to a local `ray start --head` cluster runs a tiny gad-train job to completion."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from gad_ray.driver.metrics import read_metrics
from tests.driver.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_job_server(
    port: int, head: subprocess.Popen, log: Path, timeout_s: float = 180
) -> None:
    """The dashboard's job API comes up some seconds after `ray start --head`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert head.poll() is None, f"ray start --head exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5):
                return
        except urllib.error.HTTPError:  # e.g. 401 under Ray's token auth: the server is up
            return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"the Ray job server on port {port} did not come up in {timeout_s} s")


def test_ray_job_submit_runs_a_tiny_job(tmp_path):
    # a throwaway loopback cluster: no token auth, so the job CLI needs no token file
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": ""}
    env["RAY_AUTH_MODE"] = "disabled"
    port, dash = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="gadray-", dir="/tmp")  # Unix socket paths must be short
    log = tmp_path / "ray_head.log"
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",  # what `ray start --head` takes on this 2-core machine: the
            # roles ask for 6 CPUs (a 2-core share each); their shares shrink to fit
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # ports of our own: another Ray on the machine may hold the defaults (52365, ...)
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            "--include-dashboard=true",
            f"--temp-dir={ray_tmp}",
        ],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    run_dir = tmp_path / "run"
    try:
        _wait_for_job_server(dash, head, log)
        submit = [
            str(BIN / "ray"),
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dash}",
            "--runtime-env",
            "launch/runtime_env.yaml",
            "--",
            "gad-train",
            *tiny_overrides(run_dir, "algorithm.gad.steps=1", "cluster.log_to_driver=false"),
        ]
        for _ in range(30):  # the head's job agent registers a little after its API answers
            out = subprocess.run(
                submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=900
            )
            if "No available agent to submit job" not in out.stderr:
                break
            time.sleep(2)
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]
    assert [r["stage"] for r in steps] == ["warmup", "warmup", "gad"]
    assert (run_dir / "final" / "config.json").is_file()
