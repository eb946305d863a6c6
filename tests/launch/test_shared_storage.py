"""A multi-node run checks that every node sees its run dir before any step.

Two real Ray nodes on this machine; the second runs in a mount namespace of its own with an
empty tmpfs over the "shared" storage root, as a node that did not mount the shared storage
would see it (``unshare -m``: needs root or user namespaces)."""

import subprocess
import sys

import pytest

from tests.config_builder import tiny_run

from .cluster import BIN, LocalRayCluster

# Waits for the nodes, then runs the check on a dir every node sees and on one the second node
# does not; prints each node's id by role and the outcome.
SCRIPT = """
import sys, time
from pathlib import Path
import ray
from gad_ray.config.schema import ConfigError
from gad_ray.run_dir import check_shared_run_dir

ray.init(address=sys.argv[1])
deadline = time.time() + 180
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
    time.sleep(1)
for n in ray.nodes():
    role = "blind" if "blind_node" in n["Resources"] else "head"
    print(role, n["NodeID"])
check_shared_run_dir(Path(sys.argv[2]))
print("seen by all: ok")
try:
    check_shared_run_dir(Path(sys.argv[3]))
    print("not seen: no error")
except ConfigError as err:
    print("not seen:", err)
print("probes left:", sorted(p.name for p in Path(sys.argv[2]).iterdir()))
"""


def _can_unshare() -> bool:
    out = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return out.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="unshare -m (a mount namespace) is not permitted")
def test_a_node_that_does_not_see_the_run_dir_stops_the_run(tmp_path):
    shared, local = tmp_path / "shared", tmp_path / "seen"
    (shared / "run").mkdir(parents=True)  # the driver made the run dir before the check
    local.mkdir()
    blind = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs tmpfs "{shared}" && exec "$0" "$@"',
    ]
    with LocalRayCluster(tmp_path, head_cpus=2) as cluster:
        cluster.add_node("blind", num_cpus=1, resources='{"blind_node": 1}', wrap=blind)
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, cluster.gcs, str(local), str(shared / "run")],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + cluster.logs()
        lines = out.stdout.splitlines()
        ids = dict(line.split(" ", 1) for line in lines if line.split(" ")[0] in ("head", "blind"))
        assert set(ids) == {"head", "blind"}
        assert "seen by all: ok" in lines
        (err,) = [line for line in lines if line.startswith("not seen:")]
        assert f"node {ids['blind'][:12]}" in err and ids["head"][:12] not in err
        assert "is not shared by every node" in err and "1 of 2 nodes" in err
        assert "probes left: []" in lines  # the token files are removed

        # gad-train on that cluster stops before any step, naming the node
        run_dir = shared / "run2"
        train = subprocess.run(
            [
                str(BIN / "gad-train"),
                *tiny_run(run_dir, f"cluster.address={cluster.gcs}"),
            ],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert train.returncode == 2, train.stdout[-3000:] + train.stderr[-3000:]
    assert f"trainer.run_dir='{run_dir}' is not shared by every node" in train.stderr
    assert f"node {ids['blind'][:12]}" in train.stderr
    assert "Traceback" not in train.stderr
    assert not (run_dir / "metrics.jsonl").exists()  # no step ran
    assert not (run_dir / "checkpoints").exists()
