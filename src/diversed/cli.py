"""`diversed` command line: thin over the library. User mistakes exit 2 with one line, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .errors import DiversedError, UserInputError
from .generation import MethodSpec, build_verifier, check_spec, default_method, start_generation
from .engine import GenerationConfig
from .draft_length import parse_draft_length
from .methods import METHODS, flag, knob_help, knob_owners, spec_from_knobs
from .models import BACKENDS, DTYPES, load_pair
from .sampling import SamplingParams

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--target/--draft/--dtype, shared by every command that loads a pair."""
    group = parser.add_argument_group("models (default: the embedded Qwen2.5-Coder 1.5B/0.5B pair)")
    group.add_argument("--target", help="target model: Hugging Face id, local directory or .gguf file")
    group.add_argument("--draft", help="draft model (same vocabulary as the target), or `ngram` for prompt-lookup drafting")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="torch weights dtype (default: bfloat16)")
    group.add_argument("--device", default="cpu", help="where both models run: cpu, cuda, cuda:N, mps (default: cpu)")
    group.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="auto (default): the faster of torch and llama.cpp for this pair on this machine, measured once; "
                            "torch-static (static KV cache, CUDA graphs) on a GPU")
    group.add_argument("--verbose", "-v", action="store_true", help="say which backend and draft lengths were chosen, and why")


NGRAM = "ngram"


def resolve_backend(args: argparse.Namespace) -> str:
    """Settle `--backend auto` before any run starts, for commands that record the backend as a
    setting of their output (a resumed run must use the same kernels)."""
    if args.backend == "auto":
        from .calibration import choose_backend
        from .models import DEFAULT_DRAFT, DEFAULT_TARGET

        draft = None if args.draft == NGRAM else args.draft or DEFAULT_DRAFT.name
        args.backend, _ = choose_backend(args.target or DEFAULT_TARGET.name, draft, args.dtype, args.device)
    return args.backend


def pair_from_args(args: argparse.Namespace, needs_draft: bool = True):
    """Load the pair the model flags name (no draft model for `--draft ngram`)."""
    with_draft = needs_draft and args.draft != NGRAM
    pair = load_pair(args.target, None if args.draft == NGRAM else args.draft, args.dtype, with_draft=with_draft,
                     device=args.device, backend=args.backend)
    if getattr(args, "verbose", False):
        print(f"note: backend {pair.backend} ({pair.backend_reason})", file=sys.stderr)
    return pair


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """--method and one flag per knob of the method registry, shared by `generate` and `serve`."""
    group = parser.add_argument_group("verification method")
    group.add_argument("--method", choices=METHODS, help="default: cascade:opt:0, or static w=0.9 with --draft ngram (no shipped head is a default; README)")
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
    limits = {"max_draft_length": args.max_draft_length} if getattr(args, "max_draft_length", None) else {}
    return GenerationConfig(args.max_new_tokens, parse_draft_length(args.draft_length), sampling, args.seed, stop,
                            draft_confidence=args.draft_confidence, proposer=NGRAM if args.draft == NGRAM else "model",
                            bias_budget=args.bias_budget, **limits)


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UserInputError("the prompt is empty")
    spec = method_spec_from_args(args)
    config = config_from_args(args)
    pair = pair_from_args(args, needs_draft=spec is None or spec.method != "ar")
    if spec is None:
        spec, why = default_method(pair, proposer=config.proposer)
        print(f"note: {why}", file=sys.stderr)
    verifier = build_verifier(pair, spec, config.proposer)
    generation = start_generation(pair, args.prompt, spec, config, raw=args.raw, verifier=verifier)
    if args.verbose and generation.policy is not None:
        print(f"note: draft length {describe_policy(generation.policy)}", file=sys.stderr)
    for delta in generation:
        if args.stream and args.json:
            print(json.dumps({"text_delta": delta}), flush=True)
        elif args.stream:
            print(delta, end="", flush=True)
    result = generation.result
    assert result is not None
    if args.json:
        print(json.dumps({**result.to_dict(), "backend": pair.backend, "backend_reason": pair.backend_reason}))
        return 0
    if args.stream:
        print()
    else:
        print(result.text)
    print(summary_line(result), file=sys.stderr)
    return 0


def describe_policy(policy) -> str:
    costs = getattr(policy, "costs", None)
    if costs is None:
        return f"fixed N = {policy.n}"
    v = ", ".join(f"{x:.2f}" for x in costs.verify)
    return f"auto, N in 0..{policy.max_draft_length}, c = {costs.c:.3f}, v(1..) = {v} (measured on this machine)"


def summary_line(result) -> str:
    m = result.metrics
    parts = [f"method {result.method}", f"{m.new_tokens} tokens in {m.seconds:.1f}s ({m.tokens_per_second or 0:.2f} tok/s)"]
    if m.acceptance_rate is not None:
        parts += [
            f"acceptance {m.acceptance_rate:.1%}",
            f"mean accepted length {m.mean_accepted_length:.2f}",
            f"estimated bias {m.estimated_bias:.3f}",
        ]
    elif result.method != "ar":
        parts.append("acceptance – (nothing drafted: the draft-length rule found target steps faster here; see --verbose)")
    if m.rounds:
        parts.append(f"{m.rounds} rounds, {m.drafted / m.rounds:.1f} drafted per round")
    return "[" + " · ".join(parts) + "]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diversed", description="Relaxed speculative decoding (DIVERSED).")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt")
    add_model_args(gen)
    add_method_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--raw", action="store_true", help="feed the prompt as-is (default: the target's chat template)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are committed")
    gen.add_argument("--json", action="store_true", help='print one JSON object {"text","token_ids","method","metrics","backend"}')
    gen.add_argument("--max-draft-length", type=int, default=8, help="N_max for --draft-length auto (default 8)")
    gen.set_defaults(handler=cmd_generate)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# The other subcommands (diversed/commands/) register themselves here.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []
COMMAND_MODULES = ("diversed.commands.evaluate", "diversed.commands.train", "diversed.commands.serve", "diversed.commands.mine")


def _register_optional_commands() -> None:
    import importlib

    if _EXTRA_COMMANDS:
        return  # already registered (main() may be called many times in one process)
    for module in COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue  # that part of the project is not built (or not installed)
            raise
        _EXTRA_COMMANDS.append(mod.register_cli)


def main(argv: list[str] | None = None) -> int:
    _register_optional_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except DiversedError as exc:
        print(f"error: {exc.render(flag)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
