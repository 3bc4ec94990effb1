"""Argument groups and their readers, shared by the subcommands (each command module adds its
own parser; cli.py only dispatches)."""

from __future__ import annotations

import argparse
import sys

from ..calibration import choose_backend
from ..draft_length import parse_draft_length
from ..engine import GenerationConfig
from ..generation import MethodSpec, check_spec
from ..methods import METHODS, flag, knob_help, knob_owners, spec_from_knobs
from ..errors import UserInputError
from ..models import ModelPair, load_pair, pair_specs
from ..proposers import ProposerKind, proposer_for_draft
from ..runners import AUTO, BACKEND_CHOICES, batch_backend, get_backend
from ..runners.hf import DEFAULT_DTYPE, DTYPES
from ..sampling import SamplingParams


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--target/--draft/--dtype, shared by every command that loads a pair."""
    group = parser.add_argument_group("models (default: the embedded Qwen2.5-Coder 1.5B/0.5B pair)")
    group.add_argument("--target", help="target model: Hugging Face id, local directory or .gguf file")
    group.add_argument("--draft", help="draft model (same vocabulary as the target), or `ngram` for prompt-lookup drafting")
    group.add_argument("--dtype", choices=sorted(DTYPES),
                       help=f"torch weights dtype (default: {DEFAULT_DTYPE}); naming one selects the torch backend under --backend auto")
    group.add_argument("--device", default="cpu", help="where both models run: cpu, cuda, cuda:N, mps (default: cpu)")
    group.add_argument("--backend", choices=BACKEND_CHOICES, default=BACKEND_CHOICES[0],
                       help="auto (default): the faster of torch and llama.cpp for this pair on this machine, measured once; torch on a GPU")
    group.add_argument("--verbose", "-v", action="store_true", help="say which backend and draft lengths were chosen, and why")


def proposer_from_args(args: argparse.Namespace) -> ProposerKind:
    """The proposer `--draft` names (prompt lookup for `ngram`, else the draft model)."""
    return proposer_for_draft(args.draft)


def draft_model_spec(args: argparse.Namespace) -> str | None:
    """The draft model `--draft` names (None when it names a proposer that needs none)."""
    return args.draft if proposer_from_args(args).needs_draft_model else None


def resolve_backend(args: argparse.Namespace, needs_draft: bool = True, batched: bool = False) -> str:
    """Settle `--backend auto` (and the default dtype) once, before any run starts; commands
    that record the backend as a setting of their output read it here (a resumed run must use
    the same kernels). `batched` work settles `auto` on the backend that decodes batches.
    Sets `args.backend_reason`; returns the backend's name."""
    if not hasattr(args, "backend_reason"):
        with_draft = needs_draft and proposer_from_args(args).needs_draft_model
        target, draft = pair_specs(args.target, draft_model_spec(args), with_draft)
        batching = batched and args.backend == AUTO
        backend, args.backend_reason = choose_backend(target, draft, args.dtype, args.device, batch_backend().name if batching else args.backend)
        if batching:
            args.backend_reason = f"auto: {backend.name}, the backend that decodes batches"
        args.backend, args.dtype = backend.name, args.dtype or DEFAULT_DTYPE
    return args.backend


def pair_from_args(args: argparse.Namespace, needs_draft: bool = True) -> ModelPair:
    """Load the pair the model flags name (no draft model for a proposer that needs none)."""
    resolve_backend(args, needs_draft)
    with_draft = needs_draft and proposer_from_args(args).needs_draft_model
    pair = load_pair(args.target, draft_model_spec(args), args.dtype, with_draft=with_draft, device=args.device,
                     backend=get_backend(args.backend), reason=args.backend_reason)
    if getattr(args, "verbose", False):
        print(f"note: backend {pair.backend.name} ({pair.backend_reason})", file=sys.stderr)
    return pair


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """--method and one flag per knob of the method registry, shared by `generate` and `serve`."""
    group = parser.add_argument_group("verification method")
    group.add_argument("--method", choices=METHODS, help="default: exact, by issue 23's written rule until a relaxed method is shown non-inferior (README)")
    for name, owners in knob_owners().items():
        knob = owners[0][1]
        choices = sorted({c for _, k in owners for c in k.choices or ()}) or None
        group.add_argument(flag(name), dest=name, type=knob.type, choices=choices, help=knob_help(name))


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument("--draft-length", "-N", default="auto",
                       help="draft tokens per round N, or auto (default): each round the N in 0..--max-draft-length with the "
                            "most expected tokens per second, from this machine's measured costs and the acceptance so far")
    group.add_argument("--temperature", "-T", type=float, default=1.0, help="0 = greedy (default 1.0)")
    group.add_argument("--top-k", type=int, default=0, help="0 disables (default)")
    group.add_argument("--top-p", type=float, default=1.0, help="1.0 disables (default)")
    group.add_argument("--max-new-tokens", type=int, default=128)
    group.add_argument("--seed", type=int, help="makes sampling reproducible")
    group.add_argument("--draft-confidence", type=float, default=0.0,
                       help="end a draft early when the draft's probability of its token is below this (0 = always N)")
    group.add_argument("--bias-budget", type=float,
                       help="once a response's estimated bias reaches this, verify the rest exactly (default: no budget)")


def method_spec_from_args(args: argparse.Namespace) -> MethodSpec | None:
    """The user's method, validated before any model loads; None means 'use the default'."""
    spec = spec_from_knobs(args.method, {name: getattr(args, name, None) for name in knob_owners()})
    if spec is not None:
        check_spec(spec)
    return spec


def config_from_args(args: argparse.Namespace, stop: tuple[str, ...] = ()) -> GenerationConfig:
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    max_draft_length = getattr(args, "max_draft_length", None)
    if max_draft_length is not None and max_draft_length < 1:
        raise UserInputError(f"--max-draft-length must be at least 1, got {max_draft_length}")
    limits = {"max_draft_length": max_draft_length} if max_draft_length is not None else {}
    return GenerationConfig(args.max_new_tokens, parse_draft_length(args.draft_length), sampling, args.seed, stop,
                            draft_confidence=args.draft_confidence, proposer=proposer_from_args(args).name,
                            bias_budget=args.bias_budget, **limits)
