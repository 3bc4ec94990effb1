"""`diversed` command line: thin over the library. User mistakes exit 2 with one line, no traceback.

Each subcommand is a module of diversed/commands/ with `register_cli(subparsers)`; this
module only builds the parser from them and dispatches.
"""

from __future__ import annotations

import argparse
import sys

from .commands import evaluate, generate, mine, serve, train
from .errors import DiversedError
from .methods import flag

COMMAND_MODULES = (generate, evaluate, train, serve, mine)  # in the order `diversed --help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diversed", description="Relaxed speculative decoding (DIVERSED).")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
