"""`glade params`: a Glade model's parameters by component, from a preset, a config file or a checkpoint."""

import argparse

from .loading import add_model_argument, default_model, read_config_file, read_glade_config
from .configuration_glade import PRESETS, GladeConfig
from .param_count import count_parameters, format_parameter_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`glade params`."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(PRESETS), help="a named architecture, e.g. gpt2 or gpt3-175b")
    add_model_argument(source)
    source.add_argument("--config", help="a config.json file")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    if args.preset:
        source, config = f"preset {args.preset}", GladeConfig.from_preset(args.preset)
    elif args.config:
        source, config = args.config, read_config_file(args.config)
    else:
        model = args.model or default_model()
        source, config = model, read_glade_config(model)
    print(
        f"{source}: n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd:,}, "
        f"n_inner={config.n_inner:,}, vocab_size={config.vocab_size:,}, n_positions={config.n_positions:,}, "
        f"bias={config.bias}, tied head={config.tie_word_embeddings}\n"
    )
    print(format_parameter_table(count_parameters(config)))
