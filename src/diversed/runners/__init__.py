"""Backends and their runners: the one seam between the engine and the code that runs models.

A runner is one model with its KV cache, positioned after `length` tokens. The engine,
evaluation and the proposers only ever call `feed` and `rollback` (gpt-fast's
`model_forward` plus llama.cpp's positional `llama_memory_seq_rm`). A backend (`base.Backend`)
loads models, states their facts and makes runners; each runner module exports one backend
object, and `BACKENDS` below names them. Adding a backend is its module plus one line here
(docs/backends.md).
"""

from __future__ import annotations

from ..errors import UserInputError
from .base import Backend, ModelFacts, ModelRunner
from .hf import TORCH
from .llamacpp import LLAMA_CPP
from .static_cache import TORCH_STATIC

#: Every backend by name (the order of `--backend` choices).
BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (TORCH, TORCH_STATIC, LLAMA_CPP)}
AUTO = "auto"  # not a backend: "measure, then pick one" (calibration.choose_backend)
BACKEND_CHOICES = (AUTO, *BACKENDS)


def get_backend(backend: str | Backend) -> Backend:
    """The backend object of a name (or the object itself); a one-line error for an unknown name."""
    if isinstance(backend, Backend):
        return backend
    if backend == AUTO:
        raise UserInputError("backend 'auto' is settled before a pair loads (calibration.choose_backend); name a backend here")
    if backend not in BACKENDS:
        raise UserInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend]


def batch_backend() -> Backend:
    """The backend batched work (lockstep evaluation, training) runs on."""
    return next(backend for backend in BACKENDS.values() if backend.can_batch)


__all__ = ["AUTO", "BACKENDS", "BACKEND_CHOICES", "Backend", "ModelFacts", "ModelRunner", "batch_backend", "get_backend"]
