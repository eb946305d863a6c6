"""Shared helpers of the driver tests: metrics records, checkpointed and exported weights."""

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from gad_ray.driver.metrics import read_metrics

# Wall-clock metrics, the only ones allowed to differ between two runs of the same config
# (besides every "time/<phase>" key).
# measured, not computed: times, throughputs, and the processes' peak memory (mem/*)
WALL_CLOCK = frozenset(
    {"s_per_step", "gen_tokens_per_s", "g_tokens_per_s", "d_tokens_per_s", "g_step_s", "d_step_s"}
)
WALL_CLOCK_PREFIXES = ("time/", "mem/")


def step_records(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]


def event_records(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" in r]


def without_wall_clock(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in record.items()
        if k not in WALL_CLOCK and not k.startswith(WALL_CLOCK_PREFIXES)
    }


def assert_same_records(
    actual: list[dict[str, Any]],
    expected: list[dict[str, Any]],
    rel: float = 1e-5,
    abs_tol: float = 1e-6,
) -> None:
    """Record by record: the same keys and, but for wall-clock ones, the same values."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for a, e in zip(actual, expected, strict=True):
        a, e = without_wall_clock(a), without_wall_clock(e)
        assert sorted(a) == sorted(e), (e["step"], set(a) ^ set(e))
        differ = {
            key: (a[key], value)
            for key, value in e.items()
            if not _same(a[key], value, rel, abs_tol)
        }
        assert not differ, f"step {e['step']} (actual, expected): {differ}"


def _same(a: Any, e: Any, rel: float, abs_tol: float) -> bool:
    """Equal, floats within tolerance, inside lists and dicts too (an eval's samples)."""
    if isinstance(e, float):
        return a == pytest.approx(e, rel=rel, abs=abs_tol)
    if isinstance(e, dict):
        return (
            isinstance(a, dict)
            and a.keys() == e.keys()
            and all(_same(a[k], e[k], rel, abs_tol) for k in e)
        )
    if isinstance(e, list):
        return (
            isinstance(a, list)
            and len(a) == len(e)
            and all(_same(x, y, rel, abs_tol) for x, y in zip(a, e, strict=True))
        )
    return a == e


def assert_finite(records: list[dict[str, Any]]) -> None:
    for r in records:
        for key, value in r.items():
            if isinstance(value, float):
                assert math.isfinite(value), (r["step"], key, value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out |= _flatten(v, f"{prefix}/{k}" if prefix else str(k))
        return out
    if isinstance(tree, (list, tuple)):
        return _flatten(dict(enumerate(tree)), prefix)
    return {prefix: tree}


def checkpoint_state(role_dir: Path) -> dict[str, Any]:
    """A learner checkpoint's sharded state (``<role_dir>/dcp``) read back whole, flattened:
    ``model/<param>``, ``optim/state/<param>/exp_avg``, ``frozen.reference/<param>``, ..."""
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "state.pt"
        dcp_to_torch_save(role_dir / "dcp", whole)
        return _flatten(torch.load(whole, weights_only=False))


def model_weights(role_dir: Path) -> dict[str, torch.Tensor]:
    """The trained model's parameters in a learner checkpoint."""
    state = checkpoint_state(role_dir)
    return {k[len("model/") :]: v for k, v in state.items() if k.startswith("model/")}


def exported_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``save_pretrained`` directory's safetensors files."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    assert files, f"no safetensors in {model_dir}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out |= load_file(f)
    return out


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest elementwise difference over two equal-keyed dicts of tensors (and scalars)."""
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    diff = 0.0
    for k, x in a.items():
        y = b[k]
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape, (k, x.shape, y.shape)
            if x.numel():
                diff = max(diff, (x.double() - y.double()).abs().max().item())
        elif isinstance(x, (int, float)):
            diff = max(diff, abs(x - y))
        else:
            assert x == y, (k, x, y)
    return diff


def max_rel_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest per-tensor difference relative to the tensor's scale (max |b|), so that Adam's
    tiny second moments count like the weights; non-numbers must be equal."""
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    worst = 0.0
    for k, x in a.items():
        y = b[k]
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape, (k, x.shape, y.shape)
            if x.numel():
                x, y = x.double(), y.double()
                scale = max(y.abs().max().item(), 1e-30)
                worst = max(worst, (x - y).abs().max().item() / scale)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            worst = max(worst, abs(x - y) / max(abs(y), 1e-30))
        else:
            assert x == y, (k, x, y)
    return worst
