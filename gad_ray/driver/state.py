"""Run directory layout, checkpoints and resume.

```
<run_dir>/
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
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gad_ray.config.schema import Config, ConfigError

STATE_FILE = "trainer_state.json"


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run dir and write ``config.yaml``; one that cannot be written is a
    :class:`ConfigError` naming ``trainer.run_dir``."""
    run_dir = Path(cfg.trainer.run_dir).resolve()
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
