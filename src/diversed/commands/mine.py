"""`diversed mine` (docs/mining.md): thin over diversed.mining."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserInputError
from ..mining import MineSettings, check_settings, run_mining
from ..embedded import DEFAULT_DRAFT, DEFAULT_TARGET
from ..tasks import TASKS, get_task
from .args import add_model_args, pair_from_args, resolve_backend


def cmd_mine(args: argparse.Namespace) -> int:
    if args.max_counterfactuals < 0:
        raise UserInputError(f"--max-counterfactuals must be >= 0, got {args.max_counterfactuals}")
    if args.max_likelihood_labels is not None and args.max_likelihood_labels < 0:
        raise UserInputError(f"--max-likelihood-labels must be >= 0, got {args.max_likelihood_labels}")
    if args.max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    task = get_task(args.task)
    examples = task.load(args.split, args.n, args.data_dir)
    backend = resolve_backend(args)  # settles --backend auto and the dtype, which the settings record
    settings = MineSettings(
        task=task.name, split=args.split, target=args.target or DEFAULT_TARGET.name, draft=args.draft or DEFAULT_DRAFT.name,
        dtype=args.dtype, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        max_counterfactuals=args.max_counterfactuals, seed=args.seed, max_likelihood_labels=args.max_likelihood_labels,
        control=args.control, raw=args.raw, save_hidden=args.save_hidden,
        prompt_version=task.prompt_version, backend=backend,
    )
    settings.sampling  # validates the temperature before the (slow) model load
    out_dir = Path(args.out)
    check_settings(out_dir, settings)
    pair = pair_from_args(args)
    cost = run_mining(pair, task, examples, settings, out_dir)
    print(json.dumps(cost, indent=2))
    print(f"records and cost in {out_dir}/", file=sys.stderr)
    return 0


def cmd_fit_judge(args: argparse.Namespace) -> int:
    import numpy as np

    from ..features import FEATURES
    from ..judge import fit_judge
    from ..mining import SETTINGS_FILE, importance_labels, load_positions

    features = tuple(name.strip() for name in args.features.split(",") if name.strip()) if args.features else FEATURES
    unknown = [name for name in features if name not in FEATURES]
    if unknown:
        raise UserInputError(f"unknown features {unknown}; choose from {', '.join(FEATURES)}")
    arrays = load_positions(args.records)
    mined = json.loads((Path(args.records) / SETTINGS_FILE).read_text())
    y = importance_labels(arrays, args.label, args.delta)
    if args.positions == "all":
        # Where the draft's argmax is the target's token, substituting it changes nothing:
        # unimportant by construction, and these are most of the positions the judge will see.
        y = np.where(np.isnan(y) & ~arrays["mismatch"], 0.0, y)
    labelled = ~np.isnan(y)
    columns = [arrays["feature_names"].index(name) for name in features]
    x = arrays["features"][labelled][:, columns]  # [L, F]
    # The mined projections, target's then draft's: what features.hidden_projections computes at decode time.
    hidden = np.concatenate([arrays["target_projection"], arrays["draft_projection"]], axis=1)[labelled] if args.hidden else None
    extra = {"label": args.label, "delta": args.delta if args.label == "lldrop" else None, "records": str(args.records),
             "task": mined.get("task"), "problems": len(arrays["problem_ids"]), "positions": int(labelled.sum()),
             "important": int(y[labelled].sum()), "fitted_on": args.positions, "mined_backend": mined.get("backend"), "mined_temperature": mined.get("temperature")}
    head = fit_judge(x, y[labelled], features, mined["target"], mined["draft"], extra, hidden)
    path = head.save(args.out)
    shown = {"coef": dict(zip(features, head.coef))}
    if hidden is not None:
        shown["hidden_coef_norm"] = float(np.linalg.norm(head.coef[len(features):]))
    print(json.dumps({"head": str(path), **extra, **shown}, indent=2))
    print(f"use it as --methods judge:{path}:TAU (TAU: threshold on P(important), default 0.5)", file=sys.stderr)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `mine` and `fit-judge` to the `diversed` command line."""
    mine = subparsers.add_parser("mine", help="per-position features and mismatch labels on target completions (issue 15)")
    group = mine.add_argument_group("problems")
    group.add_argument("--task", required=True, choices=list(TASKS), help="benchmark (gsm8k, mbpp, xsum have train splits)")
    group.add_argument("--split", default="train", help="data split (default train)")
    group.add_argument("--n", type=int, default=100, help="first N problems of the split (default 100)")
    group.add_argument("--data-dir", help="folder with the task's JSONL files (default: $DIVERSED_DATA_DIR)")
    group.add_argument("--raw", action="store_true", help="plain-completion prompts instead of the chat template")
    group.add_argument("--out", required=True, help="output folder; a run there resumes")
    group = mine.add_argument_group("mining")
    group.add_argument("--temperature", "-T", type=float, default=1.0, help="target sampling temperature for completions and features (default 1.0)")
    group.add_argument("--max-new-tokens", type=int, default=256, help="completion length budget, also for counterfactuals (default 256)")
    group.add_argument("--max-counterfactuals", type=int, default=8, help="counterfactual labels per problem, a seeded random subset of its mismatches (default 8)")
    group.add_argument("--max-likelihood-labels", type=int, help="likelihood labels per problem (default: every mismatch); always covers the counterfactual positions")
    group.add_argument("--control", action="store_true", help="also continue greedily from the original token at each counterfactual position (doubles their cost)")
    group.add_argument("--seed", type=int, default=0, help="base seed for completions and the counterfactual subset (default 0)")
    group.add_argument("--save-hidden", action="store_true", help="also keep the raw hidden states (float16 safetensors per problem under hidden/)")
    add_model_args(mine)
    mine.set_defaults(handler=cmd_mine)

    fit = subparsers.add_parser("fit-judge", help="fit a judge head (P(important) from per-position statistics) on mined labels")
    fit.add_argument("--records", required=True, help="a `diversed mine --out` folder")
    fit.add_argument("--label", default="lldrop", choices=("lldrop", "flip", "flip_vs_control"), help="what counts as important (default lldrop; docs/mining.md)")
    fit.add_argument("--delta", type=float, default=2.0, help="lldrop: a log-likelihood drop above this many nats is important (default 2)")
    fit.add_argument("--features", help="comma-separated subset of the mined statistics (default: all)")
    fit.add_argument("--hidden", action="store_true",
                     help="also read both models' hidden states (the mined random projections); the head then needs a backend that returns them")
    fit.add_argument("--positions", default="all", choices=("all", "mismatches"),
                     help="all (default): labelled mismatches plus every matched position as unimportant (substituting the same token changes nothing); mismatches: labelled mismatches only")
    fit.add_argument("--out", required=True, help="where to write the head (a .json file)")
    fit.set_defaults(handler=cmd_fit_judge)
