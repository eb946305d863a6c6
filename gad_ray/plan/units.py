"""Units and number formats of the plan's printout."""

from __future__ import annotations

GiB = 2**30


def count(n: float) -> str:
    """A parameter or element count: 7.62B, 80.7M, 1,024."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def gib(b: float) -> str:
    return f"{b / GiB:.1f} GiB"


def plural(k: int, what: str) -> str:
    return f"{k} {what}{'' if k == 1 else 's'}"


def ranges(idx: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None], strict=True):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)
