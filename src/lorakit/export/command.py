"""``lorakit export --to plain-lora``: the command's flags and what it prints."""

from __future__ import annotations

import argparse

from lorakit.export.factors import DEFAULT_ENERGY, DEFAULT_MAX_RANK

TARGETS = ("plain-lora",)
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 512)  # values vLLM's --max-lora-rank takes (newer releases: more)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter folder (PEFT layout) or `lorakit train` run folder")
    parser.add_argument("--to", required=True, choices=TARGETS,
                        help="plain-lora: a PEFT LoRA folder (peft_type LORA) that vLLM, SGLang, LoRAX and TGI load")
    parser.add_argument("--model", default=None,
                        help="base model folder, 'default' or 'random:...' (default: the base the adapter records)")
    parser.add_argument("--out", default=None, help="folder for the export (default: ADAPTER-plain-lora beside it); "
                                                    "an earlier export there is replaced, other files are refused")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--rank", type=int, default=None,
                      help="every module's rank (at most the rank its update has); truncates exact adapters too")
    rule.add_argument("--energy", type=float, default=None,
                      help="per module, the smallest rank keeping this share of the update's energy Σσ² "
                           "(at most --max-rank). Neither flag: an adapter whose update is a plain LoRA (LoRA, "
                           "LoRA-FA, rsLoRA, SDS-LoRA, VeRA, PiSSA/gradient-SVD offsets, Delta-LoRA) is written "
                           f"exactly at its own rank; any other (DoRA, GPart) at {DEFAULT_ENERGY}, which keeps "
                           "almost all of each ΔW while its rank stays within --max-rank; the printed logit "
                           "difference says what it cost")
    parser.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK,
                        help="the most rank --energy may give a module: serving engines reserve memory for their "
                             f"largest rank, and {DEFAULT_MAX_RANK} is the largest --max-lora-rank every vLLM "
                             "release with LoRA accepts")
    parser.add_argument("--ignore-fingerprint", action="store_true",
                        help="export even if the adapter was trained on other base weights")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    from lorakit.export.factors import RankRule

    rule = RankRule(rank=args.rank, energy=args.energy, max_rank=args.max_rank)  # a bad rule fails first
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from lorakit.export.plain_lora import export_plain_lora

    result = export_plain_lora(args.adapter, args.out, rule, args.model, check_fingerprint=not args.ignore_fingerprint)
    for line in report_lines(result):
        print(line)
    return 0


def report_lines(result) -> list[str]:
    """What the command prints: what was written, how exactly, and how to serve it."""
    summary, ranks = result.summary, result.ranks
    low, high = summary["rank"]["min"], summary["rank"]["max"]
    kept = summary["energy_kept"]
    lines = [
        f"exported {summary['source']['adapter']} ({summary['source']['title']}, {len(ranks)} modules) → "
        f"{result.out}: plain PEFT LoRA",
        f"  from {summary['how']}; scaling {summary['scaling']}",
        f"  rank {high}" if low == high else f"  ranks {low}–{high} (rank_pattern; r = {high})",
    ]
    lines[-1] += ("; exact" if summary["exact"] else
                  f"; energy kept {100 * kept['min']:.2f}% at least, {100 * kept['mean']:.2f}% on average")
    lines.append(f"  largest logit difference, original vs the written folder, on {summary['probe_texts']} probe "
                 f"texts: {result.max_logit_difference:.3g}")
    if result.task_type == "CAUSAL_LM":
        vllm_rank = next((v for v in VLLM_MAX_LORA_RANKS if v >= high), high)
        name = result.out.name.replace(" ", "-")
        lines.append(f"  serve it: vllm serve {result.base_model_name or 'BASE'} --enable-lora "
                     f"--lora-modules {name}={result.out} --max-lora-rank {vllm_rank}")
    else:
        lines.append(f"  note: serving engines generate text with causal LMs; this adapter's model is "
                     f"{result.task_type or 'an encoder'} (PEFT loads the folder; lorakit serve runs it too)")
    if result.keeps_head:
        lines.append("  note: it keeps the adapter's trained copies of whole modules (modules_to_save), which PEFT "
                     "loads and vLLM refuses")
    return lines
