"""A throwaway Ray cluster on this machine: a `ray start --head` and more `ray start` nodes,
each a real raylet, with ports of their own (another Ray on the machine may hold the defaults)."""

from __future__ import annotations

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

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """``with LocalRayCluster(log_dir) as c:`` a head with the job server up; ``c.add_node()``
    adds a node; on exit every node stops and Ray's temp dir (sessions, the runtime-env cache
    of the jobs' working dirs) is deleted."""

    def __init__(self, log_dir: Path, head_cpus: int = 2):
        # a loopback cluster without token auth: the job CLI needs no token file
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.env |= {"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
        self.port, self.dash = free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dash}"
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="gadray-", dir="/tmp"))  # short socket paths
        self.log_dir, self.head_cpus = log_dir, head_cpus
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def _start(self, args: list[str], log: Path, wrap: list[str]) -> subprocess.Popen:
        cmd = [
            *wrap,
            str(BIN / "ray"),
            "start",
            "--block",
            *args,
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--object-store-memory=200000000",
        ]
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append((proc, log))
        return proc

    def __enter__(self) -> LocalRayCluster:
        log = self.log_dir / "ray_head.log"
        head = self._start(
            [
                "--head",
                f"--num-cpus={self.head_cpus}",
                f"--port={self.port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash}",
                "--include-dashboard=true",
                f"--temp-dir={self.ray_tmp}",
            ],
            log,
            [],
        )
        try:
            self._wait_for_job_server(head, log)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def add_node(
        self, name: str, num_cpus: int = 1, resources: str = "{}", wrap: list[str] = ()
    ) -> subprocess.Popen:
        """Another node joining the head; ``wrap`` prefixes the command (e.g. ``unshare``)."""
        args = [f"--address={self.gcs}", f"--num-cpus={num_cpus}", f"--resources={resources}"]
        return self._start(args, self.log_dir / f"ray_{name}.log", list(wrap))

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for _, log in self.procs)

    def _wait_for_job_server(
        self, head: subprocess.Popen, log: Path, timeout_s: float = 180
    ) -> None:
        """The dashboard's job API comes up some seconds after `ray start --head`."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            assert head.poll() is None, f"ray start --head exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5):
                    return
            except urllib.error.HTTPError:  # e.g. 401 under Ray's token auth: the server is up
                return
            except OSError:
                time.sleep(2)
        raise AssertionError(f"the Ray job server did not come up in {timeout_s} s")

    def submit(self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):
        """Run a job-submitting command (the job CLI, a launch script); retried while the head's
        job agent is not registered yet (a little after its API answers)."""
        for _ in range(30):
            out = subprocess.run(
                cmd, cwd=cwd, env=env or self.env, capture_output=True, text=True, timeout=900
            )
            if "No available agent to submit job" not in out.stderr:
                return out
            time.sleep(2)
        return out

    def __exit__(self, *exc) -> None:
        for proc, _ in reversed(self.procs):  # the other nodes first, the head last
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
