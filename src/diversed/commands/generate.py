"""`diversed generate`: one prompt, streamed or printed, thin over diversed.generation."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import UserInputError
from ..generation import build_verifier, default_method, start_generation
from ..methods import AR, needs_draft
from .args import add_method_args, add_model_args, add_sampling_args, config_from_args, method_spec_from_args, pair_from_args


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UserInputError("the prompt is empty")
    spec = method_spec_from_args(args)
    config = config_from_args(args)
    pair = pair_from_args(args, needs_draft=spec is None or needs_draft(spec.method))
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
        print(json.dumps({**result.to_dict(), "backend": pair.backend.name, "backend_reason": pair.backend_reason}))
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
    elif result.method != AR:
        parts.append("acceptance – (nothing drafted: the draft-length rule found target steps faster here; see --verbose)")
    if m.rounds:
        parts.append(f"{m.rounds} rounds, {m.drafted / m.rounds:.1f} drafted per round")
    return "[" + " · ".join(parts) + "]"


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `generate` to the `diversed` command line."""
    gen = subparsers.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt")
    add_model_args(gen)
    add_method_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--raw", action="store_true", help="feed the prompt as-is (default: the target's chat template)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are committed")
    gen.add_argument("--json", action="store_true", help='print one JSON object {"text","token_ids","method","metrics","backend"}')
    gen.add_argument("--max-draft-length", type=int, default=8, help="N_max for --draft-length auto (default 8)")
    gen.set_defaults(handler=cmd_generate)
