"""`diversed train` (docs/training.md): thin over diversed.train."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from ..errors import UserInputError
from ..train import CHECKPOINT_DIR, HEAD_NAME, TrainSettings, load_training_examples, task_reward, train_head
from ..runners import AUTO, batch_backend, get_backend
from ..train.loop import BASELINES
from .args import add_model_args, pair_from_args, proposer_from_args


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    names = {f.name for f in fields(TrainSettings)}
    return TrainSettings(**{name: getattr(args, name) for name in names if getattr(args, name, None) is not None})


def cmd_train(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.checkpoint_every < 1:
        raise UserInputError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    task, examples = load_training_examples(args.task, settings.prompts, args.data_dir)  # before the slow model load
    if args.backend == AUTO:
        args.backend = batch_backend().name  # rollouts are batched: no speed measurement chooses here
    if not get_backend(args.backend).can_batch or not proposer_from_args(args).needs_draft_model:
        raise UserInputError(f"training needs the {batch_backend().name} backend and a draft model (batched rollouts over both models' "
                             f"KV caches); use --backend {batch_backend().name} (or auto) and a draft model")
    if task.metric_name == "pass@1":
        from ..sandbox import require_isolation

        require_isolation(args.unsafe_sandbox)  # rewards run model-written code
    pair = pair_from_args(args)
    head = train_head(
        pair, examples, task.prompt, task_reward(task), settings, args.out,
        checkpoint_every=args.checkpoint_every, stop_after=args.stop_after,
        time_limit_s=args.time_limit * 60 if args.time_limit else None,
    )
    out = Path(args.out)
    if head.config.extra.get("training"):  # set when the finished head is saved
        print(f"head saved to {out / HEAD_NAME} (use: --method diversed --head {out / HEAD_NAME})", file=sys.stderr)
    else:
        print(f"stopped early; rerun the same command to resume from {out / CHECKPOINT_DIR}", file=sys.stderr)
    return 0


# The training flags: one TrainSettings field each, with its default from TrainSettings.
TRAINING_FLAGS = {
    "prompts": "first N training examples",
    "epochs": "",
    "batch_size": "prompts per step",
    "samples_per_prompt": "completions per prompt, sharing one prefill (use >= 2 with --baseline group)",
    "max_new_tokens": "rollout length cap",
    "temperature": "> 0",
    "top_k": "0 disables",
    "top_p": "1.0 disables",
    "lam": "weight of the acceptance term S, maximised",
    "lr": "AdamW learning rate",
    "warmup_steps": "linear warm-up steps",
    "baseline": "reward baseline",
    "seed": "",
}


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` to the `diversed` command line."""
    defaults = TrainSettings()
    tr = subparsers.add_parser("train", help="train an ensemble head for a task (sequence-level RL, docs/method.md §5)")
    tr.add_argument("--task", required=True, help="gsm8k, mbpp or xsum (any task with a train split)")
    tr.add_argument("--out", required=True, help="run folder: checkpoints, train_log.jsonl, and the head (out/head); a run there resumes")
    tr.add_argument("--data-dir", help="folder with the task's JSONL files (default: $DIVERSED_DATA_DIR)")
    tr.add_argument("--unsafe-sandbox", action="store_true", help="run model-written code even where the sandbox cannot isolate it (docs/evaluation.md)")
    add_model_args(tr)
    group = tr.add_argument_group("training (see docs/training.md)")
    for name, text in TRAINING_FLAGS.items():
        default = getattr(defaults, name)
        names = ["--" + name.replace("_", "-"), *(["-T"] if name == "temperature" else [])]
        kind = {"choices": BASELINES} if name == "baseline" else {"type": type(default)}
        group.add_argument(*names, default=default, help=f"{text} (default %(default)s)".lstrip(), **kind)
    run = tr.add_argument_group("run control (does not change the result)")
    run.add_argument("--checkpoint-every", type=int, default=1, help="steps between checkpoints (default %(default)s)")
    run.add_argument("--stop-after", type=int, help="stop (resumably) after this many steps in total")
    run.add_argument("--time-limit", type=float, help="stop (resumably) after about this many minutes")
    tr.set_defaults(handler=cmd_train)
