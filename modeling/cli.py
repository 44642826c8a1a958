"""The `glade` command line: one entry point whose subcommands live next to the code they drive.

Only the module of the command that runs is imported (they pull in matplotlib, accelerate, datasets, ...), so
`glade --help` does not wait for every subsystem.
"""

import argparse
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    help: str
    # "module:function": the function adds the command's arguments and sets `func`, which runs it.
    arguments: str


COMMANDS = {
    "generate": Command("continue a prompt with a Glade model", "glade.generate:add_arguments"),
    "push": Command("publish a saved Glade model folder to the Hugging Face Hub", "glade.training.hub:add_arguments"),
    "params": Command(
        "count a Glade model's parameters by component, from its config (nothing is allocated)",
        "glade.params_command:add_arguments",
    ),
    "inspect": Command(
        "look inside a Glade model: next tokens, attention, logit lens, embeddings", "glade.inspection:add_arguments"
    ),
    "convert": Command(
        "import GPT-2 or nanoGPT weights as a Glade checkpoint", "glade.conversion.cli:add_convert_arguments"
    ),
    "export": Command("export a Glade checkpoint in another format", "glade.conversion.cli:add_export_arguments"),
    "train-tokenizer": Command(
        "train a byte-level BPE tokenizer on text", "glade.training.tokenizer:add_arguments"
    ),
    "pretrain": Command(
        "pre-train a Glade model (also under `accelerate launch`)", "glade.training.cli:add_arguments"
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command with its help line; only `command` gets its arguments, and only its module is imported."""
    parser = argparse.ArgumentParser(prog="glade", description="Glade: a GPT for the Hugging Face ecosystem.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=spec.help)
        if name == command:
            module, function = spec.arguments.split(":")
            getattr(importlib.import_module(module), function)(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `glade` itself takes no option with a value, so the first word that is not an option names the command.
    command = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    # ModuleNotFoundError: an optional dependency a command needs is not installed (its message names the extra).
    except (ValueError, FileNotFoundError, OSError, ModuleNotFoundError) as error:
        parser.exit(2, f"glade {args.command}: error: {error}\n")


if __name__ == "__main__":
    raise SystemExit(main())
