"""The `diversed` subcommands: each module adds its command with `register_cli(subparsers)` and
stays thin over the library; args.py holds the argument groups they share, and cli.py builds
the parser from the modules and dispatches."""
