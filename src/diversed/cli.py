"""`diversed` command line: thin over the library. User mistakes exit 2 with one line, no traceback.

Each subcommand is a module of diversed/commands/ with `register_cli(subparsers)`; this
module only builds the parser from them and dispatches. A command module imports torch and
the rest of the library, so only the module of the command being run is imported: `diversed
--help` lists the commands from `COMMANDS` alone and starts without torch.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import sys

from .errors import DiversedError

#: Every subcommand, in the order `diversed --help` lists them: the module of diversed/commands/
#: that registers it, and its one-line summary (the help the module gives it; tests/test_cli.py
#: checks that they agree).
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "generate text for one prompt"),
    "eval": ("evaluate", "compare decoding methods on a task: quality, acceptance, speed"),
    "pareto": ("evaluate", "exact rejection/bias front of the static ensemble on reference texts"),
    "train": ("train", "train an ensemble head for a task (sequence-level RL, docs/method.md §5)"),
    "serve": ("serve", "serve an OpenAI-compatible HTTP API (completions, chat, metrics)"),
    "mine": ("mine", "per-position features and mismatch labels on target completions (issue 15)"),
    "fit-judge": ("mine", "fit a judge head (P(important) from per-position statistics) on mined labels"),
}


def command_module(name: str):
    """The module of diversed/commands/ that registers a command (imported on first use)."""
    return importlib.import_module(f"{__package__}.commands.{COMMANDS[name][0]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `diversed` parser. With `command`, that command's module registers its commands in
    full; every other command is a stub with its summary (enough for `--help` and for argparse
    to reject an unknown name). Without it, every module registers its own."""
    parser = argparse.ArgumentParser(prog="diversed", description="Relaxed speculative decoding (DIVERSED).")
    sub = parser.add_subparsers(dest="command", required=True)
    if command is None:
        chosen = {module for module, _ in COMMANDS.values()}
    else:
        chosen = {COMMANDS[command][0]} if command in COMMANDS else set()
    registered: set[str] = set()
    for name, (module, summary) in COMMANDS.items():
        if module in chosen and module not in registered:
            command_module(name).register_cli(sub)
            registered.add(module)
        elif module not in chosen:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    _skip_final_collection()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else "")
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except DiversedError as exc:
        from .methods import flag  # loaded by every command module already

        print(f"error: {exc.render(flag)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


_exit_hook: list[bool] = []


def _skip_final_collection() -> None:
    """Have the interpreter's exit skip its last garbage collection, a walk over every object
    torch and transformers created, made only to free memory the OS takes back anyway.

    At exit (after the other exit handlers, registered later, have run: they run last in
    first out) the collector is frozen; objects are still released by their reference counts,
    and `weakref.finalize` callbacks still run.
    """
    if not _exit_hook:
        atexit.register(gc.freeze)
        _exit_hook.append(True)


if __name__ == "__main__":
    sys.exit(main())
