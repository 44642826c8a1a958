"""The `glade` command line: one entry point whose subcommands live next to the code they drive."""

import argparse
import importlib

# Each module defines `register(subparsers)`, adding its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = [
    "glade.generate",
    "glade.training.hub",
    "glade.param_count",
    "glade.inspection",
    "glade.conversion.cli",
    "glade.training.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glade", description="Glade: a GPT for the Hugging Face ecosystem.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, OSError) as error:
        parser.exit(2, f"glade {args.command}: error: {error}\n")


if __name__ == "__main__":
    raise SystemExit(main())
