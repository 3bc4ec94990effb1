"""Where diversed keeps what it builds once: assembled models, tokenizers, step costs.

Everything lives under `$DIVERSED_HOME` (default `~/.cache/diversed`); the step-cost cache
can be moved on its own with `$DIVERSED_CALIBRATION`.
"""

from __future__ import annotations

import os
from pathlib import Path


def diversed_home() -> Path:
    return Path(os.environ.get("DIVERSED_HOME", Path.home() / ".cache" / "diversed"))


def calibration_file() -> Path:
    """The per-machine step-cost cache (calibration.py)."""
    return Path(os.environ.get("DIVERSED_CALIBRATION", diversed_home() / "calibration.json"))


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
