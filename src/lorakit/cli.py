"""The ``lorakit`` command: a dict of subcommands, each a function whose flags are its options."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from lorakit.errors import InterruptedTrainingError, LorakitError


def _train(args: argparse.Namespace) -> int:
    from lorakit.train.config import from_arguments
    from lorakit.train.loop import train

    train(from_arguments(args))
    return 0


def _train_parser(parser: argparse.ArgumentParser) -> None:
    from lorakit.train.config import add_arguments

    add_arguments(parser)


def _merge(args: argparse.Namespace) -> int:
    from lorakit.io.adapter_files import base_model_for
    from lorakit.merge_export import merge_to_folder

    merge_to_folder(base_model_for(args.adapter, args.model), args.adapter, args.out,
                    check_fingerprint=not args.ignore_fingerprint)
    return 0


def _merge_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="base model folder, or 'default' (default: the base the adapter records)")
    parser.add_argument("--adapter", required=True, help="adapter folder (PEFT layout) or `lorakit train` run folder")
    parser.add_argument("--out", required=True, help="folder for the merged Hugging Face model")
    parser.add_argument("--ignore-fingerprint", action="store_true",
                        help="merge even if the adapter was trained on other base weights")


def _combine(args: argparse.Namespace) -> int:
    from lorakit.combine_files import combine_folders
    from lorakit.io.adapter_files import base_model_for

    folders = args.adapters.split(",")
    weights = [float(w) for w in args.weights.split(",")]
    combine_folders(base_model_for(folders[0], args.model), folders, weights, args.out, kind=args.type,
                    density=args.density, rank=args.rank, seed=args.seed)
    return 0


def _combine_parser(parser: argparse.ArgumentParser) -> None:
    from lorakit.combine import COMBINATIONS

    parser.add_argument("--model", default=None,
                        help="base model folder, 'default' or 'smollm2' (default: the base the first adapter records)")
    parser.add_argument("--adapters", required=True, help="comma-separated adapter or run folders")
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
                        help="adapter root: every subfolder holding adapter_config.json (or a run folder's "
                             "adapter/) is served under its name; "
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


def _eval(args: argparse.Namespace) -> int:
    from lorakit.evaluation import EvalOptions, crossed, evaluate, parse_conditions, summary_lines, write_report

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    conditions = parse_conditions(args.fail_if) if args.fail_if else []  # a typo fails before the work
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    options = EvalOptions(
        adapters=args.adapter, out=args.out, model=args.model, data=args.data or [], keep=args.keep or [],
        general=args.general, general_samples=args.general_samples, task=args.task, text_column=args.text_column,
        label_column=args.label_column, combine=args.combine, weights=weights, density=args.density, rank=args.rank,
        max_length=args.max_length, batch_size=args.batch_size, bootstrap=args.bootstrap, seed=args.seed,
        bf16=args.bf16, quiet=args.quiet, check_fingerprint=not args.ignore_fingerprint,
    )
    report = evaluate(options)
    failed = crossed(report, conditions)
    report["gates"] = {"conditions": [str(c) for c in conditions],
                       "crossed": [{"condition": str(c), "value": v} for c, v in failed]}
    write_report(report, args.out)
    print("\n".join(summary_lines(report)))
    print(f"report: {args.out}/report.html (and report.md, report.json)")
    for condition, value in failed:
        print(f"lorakit eval: fail: {condition} (value {value:.4g})", file=sys.stderr)
    return 1 if failed else 0


def _eval_parser(parser: argparse.ArgumentParser) -> None:
    from lorakit.combine import COMBINATIONS

    parser.add_argument("--adapter", action="append", required=True,
                        help="adapter folder or `lorakit train` run folder; repeat for several")
    parser.add_argument("--model", default=None,
                        help="base model folder, 'default' or 'random:...' (default: the run's)")
    parser.add_argument("--data", action="append", default=None,
                        help="task file (CSV/TSV/JSONL, or 'default'): once for all adapters or once per adapter "
                             "(default: each run's evaluation data)")
    parser.add_argument("--keep", action="append", default=None,
                        help="data the base should still handle (repeatable); default: the task file")
    parser.add_argument("--general", default=None,
                        help="general-text passages (.txt, blank-line separated, or .jsonl with 'text'); default: "
                             "the sample shipped with lorakit; 'none' skips forgetting")
    parser.add_argument("--general-samples", type=int, default=None, help="use the first N general passages")
    parser.add_argument("--task", choices=["classify", "causal-lm"], default=None, help="default: the adapter's")
    parser.add_argument("--text-column", default=None)
    parser.add_argument("--label-column", default=None)
    parser.add_argument("--combine", choices=COMBINATIONS, default=None,
                        help="also evaluate the adapters' combination, as `lorakit combine` would ship it")
    parser.add_argument("--weights", default=None, help="comma-separated combination weights (default: equal)")
    parser.add_argument("--density", type=float, default=0.5, help="ties/dare/magnitude_prune: share kept")
    parser.add_argument("--rank", type=int, default=None, help="rank of SVD-based combinations")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the run's, or 512)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the confidence intervals")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed, and a random base's seed")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="off",
                        help="bf16 autocast for the passes (parity is always in the model's own dtype)")
    parser.add_argument("--fail-if", default=None,
                        help="comma-separated conditions on report.json figures, e.g. "
                             "'keep.flips_right_to_wrong>5,general.forgetting_nats>0.1': exit 1 when one holds")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--ignore-fingerprint", action="store_true",
                        help="evaluate even if the adapters were trained on other base weights")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and report.html")


def _generate(args: argparse.Namespace) -> int:
    from lorakit.generate import GenerateOptions, generate, read_prompt

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    generate(GenerateOptions(
        prompt=read_prompt(args.prompt), model=args.model, adapter=args.adapter, chat=args.chat, system=args.system,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        stop=args.stop or [], compare=args.compare, check_fingerprint=not args.ignore_fingerprint,
    ))
    return 0


def _generate_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the text to continue (with --chat: the user's message); '-' reads stdin")
    parser.add_argument("--model", default=None,
                        help="base model: a folder, 'default' or 'random:...' (default: the base the adapter records)")
    parser.add_argument("--adapter", default=None,
                        help="adapter folder or `lorakit train` run folder (omit it to generate with the bare base)")
    parser.add_argument("--chat", action="store_true",
                        help="render the prompt as a user message with the chat template, as the server does")
    parser.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens "
                        "holding this much probability")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    parser.add_argument("--stop", action="append", default=None,
                        help="end the answer before this string (repeatable)")
    parser.add_argument("--compare", action="store_true",
                        help="print the base's answer, then the adapter's, each under a labelled line")
    parser.add_argument("--ignore-fingerprint", action="store_true",
                        help="load the adapter even if it was trained on other base weights")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def _rank(args: argparse.Namespace) -> int:
    from lorakit.rank.command import run

    return run(args)


def _sweep(args: argparse.Namespace) -> int:
    from lorakit.sweep.command import run

    return run(args)


def _rank_parser(parser: argparse.ArgumentParser) -> None:
    from lorakit.rank.command import add_arguments

    add_arguments(parser)


def _sweep_parser(parser: argparse.ArgumentParser) -> None:
    from lorakit.sweep.command import add_arguments

    add_arguments(parser)


def _export(args: argparse.Namespace) -> int:
    from lorakit.export.command import run

    return run(args)


def _plan(args: argparse.Namespace) -> int:
    from lorakit.plan.command import run

    return run(args)


def _export_parser(parser: argparse.ArgumentParser) -> None:
    from lorakit.export.command import add_arguments

    add_arguments(parser)


def _plan_parser(parser: argparse.ArgumentParser) -> None:
    from lorakit.plan.command import add_arguments

    add_arguments(parser)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "train": ("train an adapter from a YAML file and/or flags", _train_parser, _train),
    "merge": ("merge an adapter into its base and write a plain Hugging Face model folder", _merge_parser, _merge),
    "serve": ("serve a base model and its adapters over an OpenAI-compatible HTTP API", _serve_parser, _serve),
    "combine": ("combine adapters (linear, svd, ties, dare) into one new adapter", _combine_parser, _combine),
    "generate": ("try an adapter on one prompt: the answer streams to stdout", _generate_parser, _generate),
    "eval": ("what an adapter learned, broke and forgot: a regression report against its base", _eval_parser, _eval),
    "rank": ("choose LoRA ranks from measurements: gradient spectra before training, ΔW spectra and "
             "shrinking after", _rank_parser, _rank),
    "sweep": ("search train settings with Optuna: trials, a leaderboard, the best config", _sweep_parser, _sweep),
    "export": ("write an adapter as a plain PEFT LoRA that vLLM, SGLang, LoRAX and TGI serve", _export_parser,
               _export),
    "plan": ("will a training run fit? memory per device and FLOPs per token, measured on a shape-only model",
             _plan_parser, _plan),
}


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, unless the default is None (the help then says
    what happens) or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "(default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    import lorakit

    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA-family fine-tuning in HF PEFT's format.")
    parser.add_argument("--version", action="version", version=f"lorakit {lorakit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=text, description=text,
                                 formatter_class=DefaultsHelp
                                 if name != "train" else argparse.HelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except LorakitError as exc:
        if isinstance(exc, InterruptedTrainingError):
            print(f"lorakit {args.command}: {exc}", file=sys.stderr)
            return 130  # the shell's code for a run ended by Ctrl-C
        print(f"lorakit {args.command}: error: {in_cli_words(str(exc), args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: stopped", file=sys.stderr)
        return 130


# The library's errors name its Python arguments; on the command line, the flag that does the same.
CLI_WORDS = {"check_fingerprint=False": ("ignore_fingerprint", "--ignore-fingerprint")}


def in_cli_words(message: str, args: argparse.Namespace) -> str:
    """``message`` with each Python argument it suggests replaced by this command's flag (or a note
    that this command has none)."""
    for python, (dest, flag) in CLI_WORDS.items():
        if python in message:
            message = message.replace(python, flag if hasattr(args, dest) else
                                      f"{python} (in Python; `lorakit {args.command}` has no such flag)")
    return message


if __name__ == "__main__":
    raise SystemExit(main())
