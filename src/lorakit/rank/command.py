"""``lorakit rank``: choose LoRA ranks from measurements, before or after training.

- ``--model M --data FILE``: the spectra of dL/dW on a few batches of the data, and a suggested
  ``targets`` + ``rank_pattern`` for a parameter budget, as ``suggested.yaml`` for
  ``lorakit train --config``.
- ``--adapter A``: the spectra of each trained ΔW = s·B·A and how much of its rank it used.
- ``--adapter A --shrink 0.95`` / ``--shrink-rank 4``: a smaller plain-LoRA adapter in ``--out``.

Every mode writes ``rank.json``, ``spectra.png`` and ``effective_rank.png`` to ``--out`` and prints
the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.rank.spectra import Spectrum

DEFAULT_BUDGET_RATIO = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit.train.config import TASKS

    parser.add_argument("--model", default=None,
                        help="before training: the base model (a folder, 'default', 'smollm2' or 'random:...'); "
                             "with --adapter: the base to load it on, when not the one it records")
    parser.add_argument("--data", default=None,
                        help="before training: the training data as `lorakit train --data` reads it; "
                             "unset: 'default', the drug reviews")
    parser.add_argument("--adapter", default=None, help="after training: an adapter folder or `lorakit train` run")
    parser.add_argument("--out", required=True,
                        help="folder for rank.json, suggested.yaml and the plots (with --shrink: the smaller adapter)")
    before = parser.add_argument_group("before training")
    before.add_argument("--task", choices=TASKS, default="classify")
    before.add_argument("--targets", default="all-linear",
                        help="the candidate modules, in `lorakit train --targets` syntax")
    before.add_argument("--batches", type=int, default=4,
                        help="training batches the gradient is averaged over (as --init-batches of gradient-svd)")
    before.add_argument("--batch-size", type=int, default=16, help="examples per batch")
    before.add_argument("--max-length", type=int, default=None,
                        help="tokens per example; unset: chosen from the data, as `lorakit train` does")
    before.add_argument("--eval-data", default=None,
                        help="the held-out file training will use (without it a share of --data is held out, "
                             "as in training)")
    before.add_argument("--text-column", default=None)
    before.add_argument("--label-column", default=None)
    before.add_argument("--seed", type=int, default=0, help="batch order and the fresh classifier head, as in training")
    budget = before.add_mutually_exclusive_group()
    budget.add_argument("--budget-params", type=int, default=None, help="adapter parameters to spend")
    budget.add_argument("--budget-ratio", type=float, default=None,
                        help=f"adapter parameters as a share of the base model's; {DEFAULT_BUDGET_RATIO} when "
                             "neither budget is given")
    before.add_argument("--max-rank", type=int, default=64, help="the most rank one module may get")
    after = parser.add_argument_group("after training")
    shrink = after.add_mutually_exclusive_group()
    shrink.add_argument("--shrink", type=float, default=None,
                        help="write a smaller adapter keeping this share of each update's energy (e.g. 0.95)")
    shrink.add_argument("--shrink-rank", type=int, default=None, help="write a smaller adapter of this rank")
    parser.add_argument("--top", type=int, default=32, help="singular values per module written to rank.json")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.top < 1:
        raise ConfigError("--top must be at least 1")
    if args.adapter is None:
        if args.model is None:
            raise ConfigError("give --model (and --data) to measure gradients before training, or --adapter to "
                              "measure a trained adapter")
        if args.shrink is not None or args.shrink_rank is not None:
            raise ConfigError("--shrink and --shrink-rank shrink a trained adapter; give it with --adapter")
        return _before(args)
    if args.data is not None:
        raise ConfigError("--data is for measuring before training (with --model); with --adapter the figures come "
                          "from the trained factors, so drop --data")
    if args.budget_params is not None or args.budget_ratio is not None:
        raise ConfigError("--budget-params and --budget-ratio size a suggestion before training (with --model); "
                          "to make a trained adapter smaller use --shrink or --shrink-rank")
    return _after(args)


def _before(args: argparse.Namespace) -> int:
    from lorakit.rank.gradients import GradientOptions, measure_gradients
    from lorakit.rank.suggest import allocate, captured_share, suggested_settings, unit_cost, write_yaml

    started = time.perf_counter()
    options = GradientOptions(
        model=args.model, data=args.data or "default", task=args.task, targets=args.targets, batches=args.batches,
        batch_size=args.batch_size, max_length=args.max_length, text_column=args.text_column,
        label_column=args.label_column, eval_data=args.eval_data, seed=args.seed, keep=max(args.top, args.max_rank))
    if args.budget_ratio is not None and not 0 < args.budget_ratio <= 1:
        raise ConfigError(f"--budget-ratio is a share of the base model's parameters, in (0, 1]; "
                          f"got {args.budget_ratio}")
    measured = measure_gradients(options)
    spectra = measured.spectra
    ratio = args.budget_ratio if args.budget_ratio is not None else DEFAULT_BUDGET_RATIO
    budget = args.budget_params if args.budget_params is not None else round(ratio * measured.total_params)
    ranks = allocate(spectra, budget, args.max_rank)
    settings = suggested_settings(ranks, measured.module_names, measured.settings)
    spent = sum(k * unit_cost(spectra[p]) for p, k in ranks.items())
    uniform = budget // sum(unit_cost(s) for s in spectra.values())
    uniform_ranks = {p: min(uniform, s.numerical_rank) for p, s in spectra.items()}
    seconds = time.perf_counter() - started
    out = _folder(args.out)
    write_yaml(settings, out / "suggested.yaml",
               f"lorakit rank: {budget:,} parameters spent where dL/dW holds the most energy per parameter\n"
               f"(measured on {measured.examples} examples of {options.data}); train it with\n"
               f"lorakit train --config {out / 'suggested.yaml'} --out RUN")
    report = {
        "mode": "gradient", "model": options.model, "data": options.data, "task": options.task,
        "targets": options.targets, "batches": options.batches, "batch_size": options.batch_size,
        "examples": measured.examples, "max_length": measured.max_length, "seconds": round(seconds, 2),
        "total_params": measured.total_params, "budget_params": budget,
        "modules": _figures(spectra, args.top),
        "suggestion": {"ranks": {p: k for p, k in ranks.items() if k}, "params": spent,
                       "energy_share": captured_share(spectra, ranks), "settings": settings},
        "uniform": {"rank": uniform, "params": sum(k * unit_cost(spectra[p]) for p, k in uniform_ranks.items()),
                    "energy_share": captured_share(spectra, uniform_ranks)},
    }
    for path, k in ranks.items():
        report["modules"][path]["suggested_rank"] = k
    _write(out, report, spectra, f"dL/dW on {measured.examples} examples of {options.data} ({options.model})")
    print(_table(spectra, {p: str(k) for p, k in ranks.items()}, "rank"))
    chosen = [p for p, k in ranks.items() if k]
    print(f"\nbudget {budget:,} parameters ({100 * budget / measured.total_params:.2f}% of the base's "
          f"{measured.total_params:,}); suggested: {spent:,} parameters on {len(chosen)} of {len(spectra)} modules, "
          f"holding {100 * report['suggestion']['energy_share']:.1f}% of the gradient energy "
          f"(rank {uniform} on every module: {100 * report['uniform']['energy_share']:.1f}%)")
    print(f"  targets: {settings['targets']}")
    differ = len(settings["rank_pattern"])
    print(f"  rank {settings['rank']} (alpha {settings['alpha']:g})"
          + (f"; {differ} module{'s' if differ > 1 else ''} with a rank of {'their' if differ > 1 else 'its'} own "
             "(rank_pattern; the table's last column)" if differ else ""))
    print(f"measured in {seconds:.1f} s; wrote {out / 'suggested.yaml'} (lorakit train --config "
          f"{out / 'suggested.yaml'}), rank.json, spectra.png, effective_rank.png")
    return 0


def _after(args: argparse.Namespace) -> int:
    from lorakit.rank.shrink import shrink_adapter, shrink_ranks
    from lorakit.rank.trained import load_trained, trained_modules

    started = time.perf_counter()
    shrinking = args.shrink is not None or args.shrink_rank is not None
    if shrinking:  # a bad threshold fails before the base loads
        shrink_ranks({}, args.shrink, args.shrink_rank)
    loaded = load_trained(args.adapter, args.model, shrinking=shrinking)
    modules = trained_modules(loaded.model)
    spectra = {p: m.spectrum for p, m in modules.items()}
    used = {p: m.spectrum.effective_rank(0.99) for p, m in modules.items()}
    report: dict[str, Any] = {"mode": "adapter", "adapter": str(args.adapter), "model": loaded.model_spec,
                              "method": loaded.file.config.method, "modules": _figures(spectra, args.top)}
    for path, m in modules.items():
        report["modules"][path].update({"rank": m.rank, "factor_rank": m.factor_rank,
                                        "rank_used": used[path] / m.rank})
    result = None
    if shrinking:
        ranks = shrink_ranks(modules, args.shrink, args.shrink_rank)
        result = shrink_adapter(loaded, modules, ranks, _folder(args.out))
        report["shrink"] = {"energy": args.shrink, "rank": args.shrink_rank, "ranks": result.ranks,
                            "max_logit_difference": result.max_logit_difference,
                            "bytes_before": result.bytes_before, "bytes_after": result.bytes_after,
                            "params_before": result.params_before, "params_after": result.params_after}
        for path, k in result.ranks.items():
            report["modules"][path]["shrunk_rank"] = k
    report["seconds"] = round(time.perf_counter() - started, 2)
    out = _folder(args.out)
    _write(out, report, spectra, f"trained ΔW = s·B·A of {args.adapter}")
    last = {p: f"{used[p]}/{m.rank}" for p, m in modules.items()}
    print(_table(spectra, last, "r99/r", {p: str(result.ranks[p]) for p in modules} if result else None, "kept"))
    ranks_now = [m.rank for m in modules.values()]
    share = sum(used[p] for p in modules) / max(1, sum(ranks_now))
    print(f"\n{len(modules)} modules of {args.adapter} ({loaded.file.config.method}): their effective ranks at 99% "
          f"energy add up to {100 * share:.0f}% of the rank they were given")
    if result is not None:
        saved = result.bytes_before - result.bytes_after
        print(f"shrunk → {out}: ranks {min(result.ranks.values())}–{max(result.ranks.values())} (were "
              f"{min(ranks_now)}–{max(ranks_now)}), {result.params_before:,} → {result.params_after:,} factor "
              f"parameters; adapter_model.safetensors {result.bytes_before:,} → {result.bytes_after:,} bytes "
              f"({saved:,} saved, {100 * saved / result.bytes_before:.0f}%)")
        print(f"largest logit difference, original vs the written folder, on 3 probe texts: "
              f"{result.max_logit_difference:.3g}")
    print(f"wrote {out / 'rank.json'}, spectra.png, effective_rank.png")
    return 0


def _figures(spectra: dict[str, Spectrum], top: int) -> dict[str, dict[str, Any]]:
    from lorakit.rank.report import module_figures

    total = sum(s.energy for s in spectra.values())
    return {p: module_figures(s, total, top) for p, s in spectra.items()}


def _table(spectra, last, last_title, extra=None, extra_title=""):
    from lorakit.rank.report import table

    return table(spectra, last, last_title, extra, extra_title)


def _folder(path: str) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write(out: Path, report: dict[str, Any], spectra: dict[str, Spectrum], title: str) -> None:
    from lorakit.io.atomic import write_text_atomically
    from lorakit.rank.plots import plot_effective_rank, plot_spectra

    write_text_atomically(out / "rank.json", json.dumps(report, indent=2) + "\n")
    plot_spectra(spectra, out / "spectra.png", title)
    plot_effective_rank(spectra, out / "effective_rank.png", title)
