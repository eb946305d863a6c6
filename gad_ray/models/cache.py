"""Where built models (`tiny:`, `synthetic:`) are cached."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """Where `tiny:` models are built: `$GAD_RAY_CACHE/models` or `~/.cache/gad_ray/models`."""
    root = os.environ.get("GAD_RAY_CACHE")
    return Path(root) / "models" if root else Path.home() / ".cache" / "gad_ray" / "models"
