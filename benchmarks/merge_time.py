"""Merge, unmerge and merge-and-unload time, lorakit against PEFT, for LoRA and DoRA.

Same random Llama-style model as forward_latency.py; r=16, alpha=32 on every linear layer but
the LM head; lora_B random and equal in both libraries. Timed calls:

- lorakit ``am.merge()`` / ``am.unmerge()`` against PEFT ``merge_adapter()`` / ``unmerge_adapter()``;
- lorakit ``am.merge_and_unload()`` against PEFT ``merge_and_unload()``, each on a fresh deep
  copy of the adapted model (the copy is not timed).

PEFT runs with its defaults (``safe_merge=False``: no NaN check); lorakit always checks the merged
weights for NaN/Inf and accumulates in float32. Variants run round-robin; medians are reported.
The last columns check the work: the largest difference between the two libraries' merged
weights, and how far an unmerge leaves the weights from the originals.

    .venv/bin/python benchmarks/merge_time.py [--rounds 10 --threads 1 ...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import _common as c
import torch


def weights(model) -> dict[str, torch.Tensor]:
    """Base weights of the adapted linears by module path, wherever each library keeps them."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("base_layer.weight"):
            path = name.removesuffix(".base_layer.weight")
            path = path.removeprefix("model.") if hasattr(model, "adapted_layers") else path
            out[path.removeprefix("base_model.model.")] = p
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.model_args(parser, batch=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    c.set_threads(args)
    print(c.header(f"Merge / unmerge / merge_and_unload (r={args.rank}, all-linear)"))

    base = c.build_base(args)
    models = {}
    for method in ("lora", "dora"):
        lk = c.lorakit_model(base, args, method)
        models[f"lorakit {method}"] = lk
        models[f"PEFT {method}"] = c.peft_model_like(base, lk, args, method)
    originals = {k: v.detach().clone() for k, v in weights(models["lorakit lora"]).items()}

    def merge(name):
        m = models[name]
        return m.merge() if name.startswith("lorakit") else m.merge_adapter()

    def unmerge(name):
        m = models[name]
        return m.unmerge() if name.startswith("lorakit") else m.unmerge_adapter()

    times: dict[tuple[str, str], list[float]] = {}
    merged_diff: dict[str, float] = {}
    roundtrip: dict[str, float] = {}
    names = list(models)
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            spare = copy.deepcopy(models[name])
            timed = {}
            for op, fn in (("merge", merge), ("unmerge", unmerge)):
                t0 = time.perf_counter()
                fn(name)
                timed[op] = time.perf_counter() - t0
                if op == "merge" and r == 0:
                    merged_diff[name] = weights(models[name])
            t0 = time.perf_counter()
            spare.merge_and_unload()
            timed["merge_and_unload"] = time.perf_counter() - t0
            del spare
            if r >= args.warmup:
                for op, t in timed.items():
                    times.setdefault((name, op), []).append(t)
            if r == 0:
                merged_diff[name] = {k: v.detach().clone() for k, v in merged_diff[name].items()}
                roundtrip[name] = max_diff(weights(models[name]), originals)

    rows = []
    for name in names:
        method = name.split()[1]
        other = f"PEFT {method}" if name.startswith("lorakit") else f"lorakit {method}"
        rows.append([
            name,
            *(f"{1000 * statistics.median(times[(name, op)]):.0f}" for op in ("merge", "unmerge", "merge_and_unload")),
            f"{max_diff(merged_diff[name], merged_diff[other]):.1e}",
            f"{roundtrip[name]:.1e}",
        ])
    print(f"- model: Llama-style, hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}; "
          f"{c.count_adapted(models['lorakit lora'])} adapted linears, fp32")
    print(f"- {args.rounds} interleaved rounds after {args.warmup} warm-up round(s); wall-clock medians; "
          f"load average at end: {c.loadavg()}")
    print()
    print(c.table(
        ["variant", "merge ms", "unmerge ms", "merge_and_unload ms", "max abs merged-weight diff to the other library",
         "max abs weight change after merge + unmerge"],
        rows,
    ))


if __name__ == "__main__":
    main()
