"""diversed: relaxed speculative decoding (DIVERSED, Wang, Kasa et al., AISTATS 2026).

Convention: the ensemble weight `w` is the weight on the **target** (w = 1 is lossless).
"""

from .engine import GenerationConfig, decode
from .errors import DiversedError, HeadMismatchError, ModelLoadError, PairMismatchError, UserInputError
from .generation import GenerationResult, MethodSpec, build_verifier, encode_prompt, generate, start_generation
from .head import DynamicEnsemble, EnsembleHead, HeadConfig, PairSignature, load_head
from .methods import make_verifier
from .metrics import Metrics, ideal_speedup
from .models import ModelPair, load_pair
from .sampling import SamplingParams
from .verifiers import (
    Exact,
    Lenient,
    SpeculativeCascade,
    StaticEnsemble,
    TypicalAcceptance,
    Verifier,
    VerifyContext,
)

__version__ = "0.1.0"

__all__ = [
    "GenerationConfig", "decode",
    "DiversedError", "HeadMismatchError", "ModelLoadError", "PairMismatchError", "UserInputError",
    "GenerationResult", "MethodSpec", "build_verifier", "encode_prompt", "generate", "start_generation",
    "EnsembleHead", "HeadConfig", "PairSignature", "load_head",
    "Metrics", "ideal_speedup",
    "ModelPair", "load_pair",
    "SamplingParams",
    "DynamicEnsemble", "Exact", "Lenient", "SpeculativeCascade", "StaticEnsemble", "TypicalAcceptance",
    "Verifier", "VerifyContext", "make_verifier",
]
