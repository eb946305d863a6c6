"""Reward-hacking guards: bounds on a run's GAD signals, each checked over a moving window.

Each guard reads one per-step metric (docs/algorithms.md §2.2, §2.9), keeps its last
``trainer.guards.window`` values from the steps of ``trainer.guards.stages`` and compares a
statistic of the full window with its bound (``trainer.guards.<guard>``; null turns it off):

| guard | metric | trips when |
|---|---|---|
| ``len_ratio_max`` | ``len_ratio`` | the window's mean is above the bound (responses grow: §2.9) |
| ``truncation_rate_max`` | ``truncation_rate`` | the mean is above the bound |
| ``d_acc_max`` | ``d_acc`` | the mean is above the bound (D wins every pair) |
| ``d_acc_band`` | ``d_acc`` | every value is within 0.5 +- the bound (D at chance) |
| ``d_margin_min`` | ``d_teacher_score_mean - d_student_score_mean`` | the mean is below the bound |
| ``kl_max`` | ``g_kl`` | the mean is above the bound |

A guard reports a breach when it trips, and again only after its window has come back within
the bound. Pure logic: the driver turns breaches into warnings, events and a stop.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gad_ray.config.schema import GuardsConfig


@dataclass(frozen=True)
class Rule:
    """How one guard reads a step and judges its window."""

    signal: Callable[[Mapping[str, Any]], float | None]  # the step's value; None: not logged
    stat: Callable[[Sequence[float]], float]  # the window's statistic
    above: bool  # trips when the statistic is above the bound (else below it)
    what: str  # the statistic, for the message
    meaning: str  # what a breach suggests, for the message


def _key(name: str) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda m: m.get(name)


def _margin(m: Mapping[str, Any]) -> float | None:
    if "d_teacher_score_mean" not in m or "d_student_score_mean" not in m:
        return None
    return m["d_teacher_score_mean"] - m["d_student_score_mean"]


def _max_from_half(values: Sequence[float]) -> float:
    return max(abs(v - 0.5) for v in values)


RULES: dict[str, Rule] = {
    "len_ratio_max": Rule(
        _key("len_ratio"),
        statistics.fmean,
        True,
        "mean len_ratio",
        "the student's responses outgrow the teacher's, reward hacking of a stale or frozen D",
    ),
    "truncation_rate_max": Rule(
        _key("truncation_rate"),
        statistics.fmean,
        True,
        "mean truncation_rate",
        "the student's responses run into data.max_response_length",
    ),
    "d_acc_max": Rule(
        _key("d_acc"),
        statistics.fmean,
        True,
        "mean d_acc",
        "D wins nearly every pair, so its rewards barely rank the student's samples",
    ),
    "d_acc_band": Rule(
        _key("d_acc"),
        _max_from_half,
        False,
        "largest |d_acc - 0.5|",
        "D stays at chance, fooled or broken",
    ),
    "d_margin_min": Rule(
        _margin,
        statistics.fmean,
        False,
        "mean D score margin (teacher - student)",
        "D does not score the teacher above the student, fooled or broken",
    ),
    "kl_max": Rule(
        _key("g_kl"),
        statistics.fmean,
        True,
        "mean g_kl",
        "the student drifts far from its KL reference, the warmed-up student",
    ),
}


@dataclass(frozen=True)
class Breach:
    """A guard that tripped at ``step``: its window's statistic ``value`` against ``bound``."""

    name: str  # the guard, i.e. its key under trainer.guards
    step: int
    value: float
    bound: float
    window: int  # counted steps in the window
    message: str  # one line, naming the config key

    def record(self) -> dict[str, Any]:
        """The breach as the values of a ``guard`` event in metrics.jsonl."""
        return {k: v for k, v in asdict(self).items() if k != "step"}


class Guards:
    """Moving windows of the guarded metrics; :meth:`update` returns the breaches that trip."""

    def __init__(self, cfg: GuardsConfig):
        self.cfg = cfg
        names = RULES if cfg.enabled else ()
        self.bounds = {n: getattr(cfg, n) for n in names if getattr(cfg, n) is not None}
        self.windows: dict[str, deque[float]] = {n: deque(maxlen=cfg.window) for n in self.bounds}
        self.tripped: set[str] = set()

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Breach]:
        """Add one step's metrics (only steps of ``cfg.stages`` count); the guards that trip now."""
        if metrics.get("stage") not in self.cfg.stages:
            return []
        breaches = []
        for name, bound in self.bounds.items():
            rule, window = RULES[name], self.windows[name]
            value = rule.signal(metrics)
            if value is None:
                continue
            window.append(float(value))
            if len(window) < self.cfg.window:
                continue
            stat = rule.stat(window)
            if not (stat > bound if rule.above else stat < bound):
                self.tripped.discard(name)
            elif name not in self.tripped:
                self.tripped.add(name)
                breaches.append(
                    Breach(name, step, stat, bound, len(window), self.message(name, stat))
                )
        return breaches

    def message(self, name: str, stat: float) -> str:
        """One line: the statistic against its bound, what it suggests, the key to change."""
        rule, bound = RULES[name], self.bounds[name]
        side = ">" if rule.above else "<"
        steps = "/".join(self.cfg.stages)
        return (
            f"guard {name}: {rule.what} over the last {self.cfg.window} {steps} steps is "
            f"{stat:.3g} {side} {bound:g}: {rule.meaning} (bound: trainer.guards.{name}; "
            "null turns it off)"
        )
