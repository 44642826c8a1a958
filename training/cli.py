"""`glade pretrain`: the command line of `glade.training.pretrain`, one flag per `PretrainConfig` field."""

from __future__ import annotations

import argparse
import logging

from . import pretrain, pretrain_config
from .pretrain_config import PretrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = pretrain.__doc__.split("\n\n")[0]
    pretrain_config.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pretrain.pretrain(PretrainConfig.from_args(args))
