"""Run directory layout, checkpoints and resume.

```
<run_dir>/                 absolute; on a cluster, storage every node sees (checked at start)
  config.yaml            the validated config (no secrets: the API key lives in the env only)
  metrics.jsonl          one record per step; tensorboard/ beside it; plot.png at the end
  checkpoints/step_00000010/
      generator/ discriminator/   sharded learner state (model, optimizer, schedule, RNG)
      trainer_state.json          step, data position, RNG and the size of every file of
                                  the checkpoint: written LAST (atomically), so a checkpoint is
                                  complete when it is present and every listed file is whole
  final/                 the student in HF format (transformers and vLLM load it)
```
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gad_ray.config.schema import Config, ConfigError

STATE_FILE = "trainer_state.json"
RAY_RUNTIME_DIR = "runtime_resources"  # <ray session dir>/runtime_resources/working_dir_files/...


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run dir and write ``config.yaml``; one that cannot be written, or that lies in
    Ray's runtime-env cache, is a :class:`ConfigError` naming ``trainer.run_dir``."""
    run_dir = Path(os.path.abspath(cfg.trainer.run_dir))
    check_durable(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        )
    except OSError as err:
        raise ConfigError(
            f"trainer.run_dir={cfg.trainer.run_dir!r}: cannot write the run directory "
            f"({err.strerror or err})"
        ) from None
    return run_dir


def check_durable(run_dir: Path) -> None:
    """Refuse a run dir inside Ray's runtime-env cache (``<session>/runtime_resources/...``):
    in a Ray job, a relative run dir lands in the job's unpacked ``working_dir``, which Ray
    deletes when the cache grows, and of which every node has its own copy."""
    for form in (run_dir, Path(os.path.realpath(run_dir))):
        parts = form.parts
        if any(
            p == RAY_RUNTIME_DIR and any(q.startswith("session_") for q in parts[:i])
            for i, p in enumerate(parts)
        ):
            raise ConfigError(
                f"trainer.run_dir={str(run_dir)!r} is inside Ray's runtime-env cache (a Ray "
                "job's unpacked working_dir), which Ray deletes and every node keeps its own "
                "copy of: set trainer.run_dir to an absolute path on storage every node mounts "
                "(with launch/submit_*.sh: RUN_ROOT=/shared/...; docs/cluster.md#run-storage)"
            )


def check_shared_run_dir(run_dir: Path, timeout_s: float = 300.0) -> None:
    """On a Ray cluster of several nodes, check that every node sees ``run_dir``: a token file
    written here is read by a task pinned to each node. A node that does not see it (local disk
    instead of shared storage, another mount) is a :class:`ConfigError` naming the nodes."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    token = secrets.token_hex(16)
    probe = run_dir / f".node_check_{token}"
    probe.write_text(token)
    try:
        refs = {
            _read_text.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote(str(probe)): n
            for n in nodes
        }
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        seen = {refs[r]["NodeID"] for r in done if _answer(r) == token}
    finally:
        probe.unlink(missing_ok=True)
    blind = [n for n in nodes if n["NodeID"] not in seen]
    if blind:
        names = ", ".join(
            f"{n.get('NodeManagerHostname', '?')} ({n['NodeManagerAddress']}, node "
            f"{n['NodeID'][:12]})"
            for n in blind
        )
        raise ConfigError(
            f"trainer.run_dir={str(run_dir)!r} is not shared by every node of the Ray cluster: "
            f"a file the driver wrote there is not visible (or did not answer in {timeout_s:.0f} "
            f"s) from {len(blind)} of {len(nodes)} nodes: {names}. Put the run dir on storage "
            "every node mounts at the same path (NFS, a parallel file system): "
            "trainer.run_dir=/shared/..., or RUN_ROOT=/shared/... with launch/submit_*.sh "
            "(docs/cluster.md#run-storage)"
        )


@ray.remote(max_retries=0)
def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _answer(ref: ray.ObjectRef) -> str | None:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError:  # the task could not run on that node
        return None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first; a partial one (no state file, or a file
    missing or cut short) is skipped with a warning."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        problem = checkpoint_problem(p)
        if problem is None:
            out.append(p)
        elif (p / STATE_FILE).exists():  # looked complete: say why it is skipped
            warnings.warn(f"skipping checkpoint {p}: {problem}", stacklevel=2)
    return out


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` is not a complete checkpoint, or None when it is."""
    try:
        files = json.loads((ckpt / STATE_FILE).read_text()).get("files", {})
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} is missing or unreadable ({err})"
    for rel, size in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
    return None


def find_resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """``resume=auto``: the newest complete checkpoint (or None); ``never``: None; else a path."""
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    path = Path(mode)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"trainer.resume={mode!r}: not a complete checkpoint ({problem})")
    return path


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def write_trainer_state(ckpt: Path, state: dict[str, Any]) -> None:
    """Write the driver's state last and atomically, with the size of every file the roles
    wrote: it marks the checkpoint complete (:func:`checkpoint_problem` checks the sizes)."""
    files = {
        str(f.relative_to(ckpt)): f.stat().st_size
        for f in sorted(ckpt.rglob("*"))
        if f.is_file() and not f.name.startswith(STATE_FILE)
    }
    tmp = ckpt / (STATE_FILE + ".tmp")
    with tmp.open("w") as out:
        json.dump({**state, "files": files}, out, default=_json_default)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(ckpt / STATE_FILE)


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")
