"""Shared fixtures: a tiny real draft/target pair (random-init Qwen2, char tokenizer)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from diversed.models import load_pair
from diversed.testing import build_tiny_gguf, build_tiny_model

REPO = Path(__file__).resolve().parents[1]


def import_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
SHARED_DATA = REPO.parent / "shared" / "data"  # the full benchmark files (whole-split checks need them)
def _synthetic_data(folder: Path) -> Path:
    """A few made-up GSM8K and MBPP rows in the datasets' formats (no benchmark text is shipped):
    enough to mine and benchmark on with the tiny models, in a clean clone without ../shared."""
    import json

    def write(name, rows):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))

    folder.mkdir(parents=True, exist_ok=True)
    gsm8k = [{"question": f"Tom has {i} apples and buys 2 more. How many apples does he have?",
              "answer": f"He has {i} + 2 = {i + 2} apples.\n#### {i + 2}"} for i in range(3, 8)]
    write("gsm8k_test.jsonl", gsm8k)
    write("gsm8k_train.jsonl", gsm8k)
    write("mbpp.jsonl", [{"text": f"Write a function add_{i} that adds {i} to a number.", "code": f"def add_{i}(a):\n    return a + {i}",
                          "task_id": i, "test_setup_code": "", "test_list": [f"assert add_{i}(1) == {1 + i}"], "challenge_test_list": []}
                         for i in [*range(1, 16), 601, 602, 603]])
    return folder


FIXTURE_DATA = _synthetic_data(Path(tempfile.mkdtemp(prefix="diversed-test-data-")))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return build_tiny_model(root / "tiny-target", seed=1, sharpness=10.0), build_tiny_model(root / "tiny-draft", seed=1, sharpness=10.0, perturb=1.0)


@pytest.fixture(scope="session", autouse=True)
def _calibration_cache(tmp_path_factory):
    """Step costs measured by tests (tiny models) go to a file of the session's own, never the
    user's cache; server processes started by tests inherit it."""
    os.environ["DIVERSED_CALIBRATION"] = str(tmp_path_factory.mktemp("calibration") / "calibration.json")
    yield


@pytest.fixture(scope="session")
def tiny_gguf_paths(tiny_model_dirs, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny pair written as f32 GGUF files (each beside its tokenizer) for the llama.cpp backend."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    (root / "t").mkdir()
    (root / "d").mkdir()
    return build_tiny_gguf(tiny_model_dirs[0], root / "t" / "tiny-target.gguf"), build_tiny_gguf(tiny_model_dirs[1], root / "d" / "tiny-draft.gguf")


@pytest.fixture(scope="session")
def tiny_gguf_pair(tiny_gguf_paths):
    return load_pair(str(tiny_gguf_paths[0]), str(tiny_gguf_paths[1]), backend="llama.cpp")


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
