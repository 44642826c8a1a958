"""`glade pretrain`: the command-line arguments and entry point of `glade.training.pretrain`."""

from __future__ import annotations

import argparse

from . import pretrain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = pretrain.__doc__.split("\n\n")[0]
    pretrain.add_arguments(parser)
    parser.set_defaults(func=pretrain.run)
