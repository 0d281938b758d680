"""``segrank config show CONFIG``: the resolved config, as YAML that loads again."""

from __future__ import annotations

import argparse

from segrank import files
from segrank.cli.flags import SubParsers, add_set_option, command_group
from segrank.config import load_config, to_dict


def add_parser(sub: SubParsers) -> None:
    actions = command_group(sub, "config", "inspect configs (every key and its allowed values: docs/config.md)")
    p = actions.add_parser("show", help="print the resolved config (bases merged, overrides applied, values checked) "
                                        "as YAML; it loads again as a config file")
    p.add_argument("config", help="YAML config file")
    add_set_option(p, "train.max_iters=1000")
    p.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    """Print the config after ``_base_`` composition, ``--set`` overrides and derived defaults, checked like every
    command checks it; the output loads again as a config file."""
    cfg = load_config(args.config, args.set)
    print(files.dump_yaml(to_dict(cfg)), end="")
    return 0
