"""Run directory layout, checkpoints and resume.

```
<run_dir>/
  config.yaml            the validated config (no secrets: the API key lives in the env only)
  metrics.jsonl          one record per step; tensorboard/ beside it; plot.png at the end
  checkpoints/step_00000010/
      generator/ discriminator/   sharded learner state (model, optimizer, schedule, RNG)
      trainer_state.json          step, data position, RNG: written LAST, so its presence
                                  marks a complete checkpoint
  final/                 the student in HF format (transformers and vLLM load it)
```
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gad_ray.config.schema import Config

STATE_FILE = "trainer_state.json"


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.trainer.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    )
    return run_dir


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / STATE_FILE).is_file())


def find_resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """``resume=auto``: the newest complete checkpoint (or None); ``never``: None; else a path."""
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    if mode == "auto":
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    path = Path(mode)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"trainer.resume={mode!r}: not a complete checkpoint (no {STATE_FILE} in it)"
        )
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
    """Write the driver's state last and atomically: it marks the checkpoint complete."""
    tmp = ckpt / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, default=_json_default))
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
