"""Inference latency of one forward pass: bare base, lorakit and PEFT, unmerged and merged.

A random Llama-style model (LlamaConfig: hidden 768, 6 layers, intermediate 2048, 12 heads,
vocab 32000) gets LoRA r=16, alpha=32 on every linear layer but the LM head. lora_B is set to
random values (it starts at 0), identical in both libraries. fp32, eval mode, no_grad. The
variants run round-robin (order rotating each round) after a warm-up; each variant is its own
copy of the model. Ratios are medians of per-round ratios, so a load spike hits both sides.

    .venv/bin/python benchmarks/forward_latency.py [--batch 16 --seq 128 --rounds 10 --threads 1 --method lora ...]
"""

from __future__ import annotations

import argparse
import copy

import _common as c
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.model_args(parser, batch=16)
    parser.add_argument("--method", choices=["lora", "dora"], default="lora")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-peft", action="store_true", help="time lorakit and the base only")
    args = parser.parse_args()
    c.set_threads(args)
    print(c.header(f"Forward latency ({args.method}, r={args.rank}, all-linear)"))

    base = c.build_base(args)
    ids = c.inputs(args)
    lk = c.lorakit_model(base, args, args.method)
    lk_merged = copy.deepcopy(lk)
    lk_merged.merge()
    models = {"base (no adapters)": base, "lorakit unmerged": lk, "lorakit merged": lk_merged}
    if not args.no_peft:
        pm = c.peft_model_like(base, lk, args, args.method)
        pm_merged = copy.deepcopy(pm)
        pm_merged.merge_adapter()
        models |= {"PEFT unmerged": pm, "PEFT merged": pm_merged}
    for m in models.values():
        m.eval()

    def call(model):
        def run():
            with torch.no_grad():
                return model(input_ids=ids).logits
        return run

    fns = {name: call(m) for name, m in models.items()}
    # The first warm-up round doubles as the honesty check: every variant computes the adapted
    # function (the bare base differs from it).
    ref = fns["lorakit unmerged"]()
    diffs = {name: (fn() - ref).abs().max().item() for name, fn in fns.items()}
    del ref
    wall, cpu = c.round_robin(fns, args.rounds, args.warmup - 1)

    ref_of = {"lorakit unmerged": "lorakit merged", "PEFT unmerged": "PEFT merged"}
    rows = []
    for name in fns:
        own = ref_of.get(name)
        rows.append([
            name, f"{c.median_ms(wall[name]):.0f}", f"{c.median_ms(cpu[name]):.0f}",
            f"{c.paired_ratio(cpu, name, 'base (no adapters)'):.3f}",
            f"{c.paired_ratio(cpu, name, own):.3f}" if own else "—",
            f"{c.paired_ratio(wall, name, own):.3f}" if own else "—",
            f"{diffs[name]:.1e}",
        ])
    print(f"- model: Llama-style, hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
          f"{args.heads} heads, vocab {args.vocab}; {c.count_adapted(lk)} adapted linears; "
          f"input {args.batch} × {args.seq} tokens, {args.dtype} base, eval, no_grad")
    print(f"- {args.rounds} interleaved rounds after {args.warmup} warm-up rounds; ratios are medians of per-round "
          f"ratios; load average at end: {c.loadavg()}")
    print()
    print(c.table(
        ["variant", "median wall ms", f"median {c.CLOCK} ms", f"× base ({c.CLOCK})", f"× own merged ({c.CLOCK})",
         "× own merged (wall)",
         "max abs logit diff to lorakit unmerged"],
        rows,
    ))


if __name__ == "__main__":
    main()
