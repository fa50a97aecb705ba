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


def _combine(args: argparse.Namespace) -> int:
    from lorakit.combine_files import combine_folders

    combine_folders(args.model, args.adapters.split(","), [float(w) for w in args.weights.split(",")], args.out,
                    kind=args.type, density=args.density, rank=args.rank, seed=args.seed)
    return 0


def _combine_parser(parser: argparse.ArgumentParser) -> None:
    from lorakit.combine import COMBINATIONS

    parser.add_argument("--model", required=True, help="base model folder, or 'default'")
    parser.add_argument("--adapters", required=True, help="comma-separated adapter folders (PEFT layout)")
    parser.add_argument("--weights", required=True, help="comma-separated weights, one per adapter (may be negative)")
    parser.add_argument("--type", default="linear", choices=COMBINATIONS, help="how to combine")
    parser.add_argument("--density", type=float, default=0.5, help="share of entries kept by ties/dare/magnitude_prune")
    parser.add_argument("--rank", type=int, default=None, help="rank of SVD-based results (default: largest input)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")
    parser.add_argument("--out", required=True, help="folder for the combined adapter")


def _serve(args: argparse.Namespace) -> int:
    import importlib.util
    import os

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise LorakitError("serve needs fastapi and uvicorn: pip install 'lorakit[serve]'")
    import torch

    from lorakit.serve import build_engine, run_server

    for flag in ("max_batch_size", "max_tokens_limit", "max_prompt_tokens", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise LorakitError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args.model, args.adapters, max_prompt_tokens=args.max_prompt_tokens,
                          max_tokens_limit=args.max_tokens_limit, seed=args.seed)
    run_server(engine, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LORAKIT_API_KEY"),
               max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
               max_body_bytes=args.max_body_bytes, log_level=args.log_level)
    return 0


def _serve_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model: a folder, 'default', or 'random:<arch>,...'")
    parser.add_argument("--adapters", required=True,
                        help="adapter root: every subfolder holding adapter_config.json is served under its name; "
                             "POST /v1/adapters loads only from folders under it")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every endpoint (or set $LORAKIT_API_KEY)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows per mixed-adapter batch")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="how long the batcher waits for more requests after the first")
    parser.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body accepted")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random:... base model's weights")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "train": ("train an adapter from a YAML file and/or flags", _train_parser, _train),
    "merge": ("merge an adapter into its base and write a plain Hugging Face model folder", _merge_parser, _merge),
    "serve": ("serve a base model and its adapters over an OpenAI-compatible HTTP API", _serve_parser, _serve),
    "combine": ("combine adapters (linear, svd, ties, dare) into one new adapter", _combine_parser, _combine),
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
