"""The `attend-robust` command line: `attack` runs HackAttend, `finetune` trains a victim model."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attend-robust",
        description="Attack self-attention with HackAttend and train robust models with S-Attend.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Each subcommand module registers its parser and sets `func` to the function that runs it.
    from .hackattend.command import add_attack_command
    from .training import add_finetune_command

    add_attack_command(subparsers)
    add_finetune_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
