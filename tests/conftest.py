"""Shared fixtures: a tiny real draft/target pair (random-init Qwen2, char tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diversed.models import load_pair
from diversed.testing import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return build_tiny_model(root / "tiny-target", seed=1, sharpness=10.0), build_tiny_model(root / "tiny-draft", seed=1, sharpness=10.0, perturb=1.0)


@pytest.fixture(scope="session")
def tiny_pair(tiny_model_dirs):
    target, draft = tiny_model_dirs
    return load_pair(str(target), str(draft), dtype="float32")


DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _threads_for_model_size(request):
    """Tiny models run fastest on one thread (no OpenMP sync on a shared 2-core box); the
    real pair (tests marked slow) gets every core."""
    torch.set_num_threads(DEFAULT_THREADS if request.node.get_closest_marker("slow") else 1)
    yield
