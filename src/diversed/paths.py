"""Where diversed keeps what it builds once: assembled models, tokenizers, step costs; and how
a head's files are named.

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


def strip_head_suffix(path: Path) -> Path:
    """A head's base name, from the name or either of its files (NAME.json, NAME.safetensors)."""
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def head_file(base: Path, suffix: str) -> Path:
    """`base` + suffix: a head named `cascade-0.3` is `cascade-0.3.json`, not `cascade-0.json`."""
    return base.with_name(base.name + suffix)
