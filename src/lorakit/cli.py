"""The ``lorakit`` command: a dict of subcommands, each a function whose flags are its options."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from lorakit.errors import LorakitError


def _train(args: argparse.Namespace) -> int:
    from lorakit.train.config import from_arguments
    from lorakit.train.loop import train

    train(from_arguments(args))
    return 0


def _train_parser(parser: argparse.ArgumentParser) -> None:
    from lorakit.train.config import add_arguments

    add_arguments(parser)


def _merge(args: argparse.Namespace) -> int:
    from lorakit.merge_export import merge_to_folder

    merge_to_folder(args.model, args.adapter, args.out, check_fingerprint=not args.ignore_fingerprint)
    return 0


def _merge_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model folder, or 'default'")
    parser.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    parser.add_argument("--out", required=True, help="folder for the merged Hugging Face model")
    parser.add_argument("--ignore-fingerprint", action="store_true",
                        help="merge even if the adapter was trained on other base weights")


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "train": ("train an adapter from a YAML file and/or flags", _train_parser, _train),
    "merge": ("merge an adapter into its base and write a plain Hugging Face model folder", _merge_parser, _merge),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA-family fine-tuning in HF PEFT's format.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=text, description=text,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter
                                 if name != "train" else argparse.HelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except LorakitError as exc:
        print(f"lorakit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
