"""The `diversed` subcommands besides `generate` (which lives in cli.py): each module adds its
command with `register_cli(subparsers)` and stays thin over the library (cli.py imports them)."""
