"""diversed: relaxed speculative decoding (DIVERSED, Wang, Kasa et al., AISTATS 2026).

Convention: the ensemble weight `w` is the weight on the **target** (w = 1 is lossless).

The names below are loaded on first use (PEP 562), so importing a part of the package that
needs no torch (the command line's `--help`, `diversed.errors`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_EXPORTS = {
    "GenerationConfig": "engine", "decode": "engine",
    "DiversedError": "errors", "HeadMismatchError": "errors", "ModelLoadError": "errors", "PairMismatchError": "errors",
    "UserInputError": "errors",
    "GenerationResult": "generation", "MethodSpec": "generation", "build_verifier": "generation", "encode_prompt": "generation",
    "generate": "generation", "start_generation": "generation",
    "DynamicEnsemble": "head", "EnsembleHead": "head", "HeadConfig": "head", "PairSignature": "head", "load_head": "head",
    "make_verifier": "methods",
    "Metrics": "metrics", "ideal_speedup": "metrics",
    "ModelPair": "models", "load_pair": "models",
    "SamplingParams": "sampling",
    "Exact": "verifiers", "Lenient": "verifiers", "SpeculativeCascade": "verifiers", "StaticEnsemble": "verifiers",
    "TypicalAcceptance": "verifiers", "Verifier": "verifiers", "VerifyContext": "verifiers",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from .engine import GenerationConfig, decode
    from .errors import DiversedError, HeadMismatchError, ModelLoadError, PairMismatchError, UserInputError
    from .generation import GenerationResult, MethodSpec, build_verifier, encode_prompt, generate, start_generation
    from .head import DynamicEnsemble, EnsembleHead, HeadConfig, PairSignature, load_head
    from .methods import make_verifier
    from .metrics import Metrics, ideal_speedup
    from .models import ModelPair, load_pair
    from .sampling import SamplingParams
    from .verifiers import Exact, Lenient, SpeculativeCascade, StaticEnsemble, TypicalAcceptance, Verifier, VerifyContext
