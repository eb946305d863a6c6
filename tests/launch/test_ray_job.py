"""Ray Jobs: `launch/submit.sh` submits a tiny gad-train run to a local `ray start --head`
cluster; its outputs land under RUN_ROOT and survive Ray deleting the job's working_dir cache.
A run dir left inside that cache is refused before anything starts."""

import json
import shutil
import subprocess
from pathlib import Path

from gad_ray.driver.metrics import read_metrics
from gad_ray.run_dir import checkpoint_problem
from tests.config_builder import tiny_run

from .cluster import BIN, LocalRayCluster

REPO = Path(__file__).resolve().parents[2]


def _overrides(*extra: str) -> list[str]:
    """The tiny CPU run without a trainer.run_dir: the job decides where it goes."""
    keep = [o for o in tiny_run("unused") if not o.startswith("trainer.run_dir=")]
    return [*keep, "cluster.log_to_driver=false", *extra]


def _working_dirs(ray_tmp: Path) -> list[Path]:
    """The jobs' unpacked working_dirs in Ray's runtime-env cache."""
    return list(ray_tmp.glob("session_*/runtime_resources/working_dir_files/*"))


def test_ray_job_outputs_go_to_run_root_and_survive_the_cache(tmp_path):
    run_root = tmp_path / "shared" / "runs"  # stands for storage every node mounts
    # the roles ask for 6 CPUs (a 2-core share each); on a 2-CPU head their shares shrink to fit
    with LocalRayCluster(tmp_path, head_cpus=2) as cluster:
        # a run dir in the job's working dir (Hydra's default, relative to it) is refused
        refused = cluster.submit(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                f"--address={cluster.dashboard}",
                "--runtime-env",
                "launch/runtime_env.yaml",
                "--",
                "gad-train",
                *_overrides(),
            ],
            cwd=REPO,
        )
        assert refused.returncode != 0, refused.stdout[-3000:]
        log = refused.stdout + refused.stderr
        assert "trainer.run_dir=" in log and "runtime_resources/working_dir_files" in log
        assert "is inside Ray's runtime-env cache" in log and "RUN_ROOT=/shared/" in log
        assert "Traceback" not in log  # a config error, printed alone

        # the submit script: the run dir is RUN_ROOT/RUN_NAME; a 2-step tiny run (1 warmup step,
        # 1 GAD step: 16 prompts, 4 per step)
        env = {**cluster.env, "RAY_ADDRESS": cluster.dashboard, "RUN_ROOT": str(run_root)}
        env["RUN_NAME"] = "tiny"
        out = cluster.submit(
            [
                "bash",
                "launch/submit.sh",
                "experiment=tiny_cpu",
                "cluster=local",
                *_overrides("algorithm.warmup.epochs=0.25", "algorithm.gad.steps=1"),
            ],
            env=env,
            cwd=REPO,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + cluster.logs()
        assert "succeeded" in out.stdout
        cache = _working_dirs(cluster.ray_tmp)
        assert cache, "no job working_dir in Ray's cache"  # the jobs did run from there...
        for wd in cache:  # ...and the run wrote nothing into it
            assert not list(wd.glob("outputs/*/checkpoints")), wd
            assert not list(wd.rglob("metrics.jsonl")), wd
        # Ray deletes its runtime-env cache (here, by hand: then the whole temp dir on exit)
        for runtime in cluster.ray_tmp.glob("session_*/runtime_resources"):
            shutil.rmtree(runtime)
    assert not cluster.ray_tmp.exists()

    run_dir = run_root / "tiny"
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]
    assert [(r["step"], r["stage"]) for r in steps] == [(0, "warmup"), (1, "gad")]
    assert checkpoint_problem(run_dir / "checkpoints" / "step_00000002") is None
    final = run_dir / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "qwen2"
    assert list(final.glob("*.safetensors"))
    assert (run_dir / "plot.png").is_file()
    saved = (run_dir / "config.yaml").read_text()
    assert f"run_dir: {run_dir}\n" in saved  # the absolute path the user asked for


def test_submit_script_requires_an_absolute_run_root(tmp_path):
    for script in sorted((REPO / "launch").glob("*.sh")):  # each one parses
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, (script.name, out.stderr)
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "RAY_ADDRESS": "http://127.0.0.1:1"}
    script = str(REPO / "launch" / "submit.sh")
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "set RUN_ROOT" in out.stderr
    out = subprocess.run(
        ["bash", script], env={**env, "RUN_ROOT": "runs"}, capture_output=True, text=True
    )
    assert out.returncode == 2 and "RUN_ROOT=runs: must be an absolute path" in out.stderr
    multi = str(REPO / "launch" / "submit_multi_node.sh")
    out = subprocess.run(["bash", multi], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "set RUN_ROOT" in out.stderr
