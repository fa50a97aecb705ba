"""Mixed-adapter batches: N different adapters in one batch vs one adapter for the whole batch.

The random Llama-style model of the other benchmarks (hidden 768, 6 layers, vocab 32000)
carries N LoRA adapters (r=16, alpha=32, all-linear), each with its own random A and B,
identical in lorakit and in HF PEFT. The batch has N rows of 128 tokens; in a mixed batch row i
runs through adapter i. Variants, each on its own copy of the model, fp32, eval, no_grad:

- ``lorakit mixed``: ``model(input_ids, adapter_names=[a0, …, aN-1])``, the same mix every call;
- ``lorakit mixed, new mix``: the names rotate by one row each call, so every batch is a mix
  the model has not seen (what a server with continuous batching sends);
- ``lorakit single``: all rows through adapter a0, the normal unmerged path;
- ``PEFT mixed`` (``model(input_ids, adapter_names=[...])``) and ``PEFT single``;
- the bare base for reference.

Checks: lorakit's and PEFT's mixed logits equal each row run alone through its adapter
(lorakit, one row at a time); PEFT single equals lorakit single. Variants run round-robin (order
rotating each round) after one call each; ratios are medians of per-round ratios.

    .venv/bin/python benchmarks/mixed_batch.py [--adapters 16,64 --rounds 8,3 --seq 128 --threads 1 ...]
"""

from __future__ import annotations

import argparse
import copy

import _common as c
import torch


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.model_args(parser, batch=0)
    parser.add_argument("--adapters", type=int_list, default=[16, 64],
                        help="comma-separated numbers of adapters; the batch has one row per adapter")
    parser.add_argument("--rounds", type=int_list, default=[8, 3], help="timed rounds for each --adapters value")
    parser.add_argument("--no-peft", action="store_true", help="time lorakit and the base only")
    args = parser.parse_args()
    if len(args.rounds) != len(args.adapters):
        parser.error("--rounds needs one value per --adapters value")
    c.set_threads(args)
    print(c.header(f"Mixed-adapter batches (LoRA r={args.rank}, all-linear)"))

    names = [f"a{i:02d}" for i in range(max(args.adapters))]
    base = c.build_base(args)
    lk = c.lorakit_adapters(base, args, names)
    lk.eval()
    lk_new_mix = copy.deepcopy(lk)  # its own stack cache, so the rotating mix never evicts the steady one
    models = {"base (no adapters)": base, "lorakit": lk, "lorakit new mix": lk_new_mix}
    if not args.no_peft:
        models["PEFT"] = c.peft_adapters_like(base, lk, args, names).eval()
    print(f"- model: Llama-style, hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
          f"{args.heads} heads, vocab {args.vocab}; {c.count_adapted(lk, names[0])} adapted linears per adapter, "
          f"{len(names)} adapters loaded in each library; {args.dtype} base, eval, no_grad")

    for n, rounds in zip(args.adapters, args.rounds, strict=True):
        print()
        print(section(n, rounds, args, models, names[:n]))


def section(n: int, rounds: int, args: argparse.Namespace, models: dict, names: list[str]) -> str:
    ids = c.inputs(argparse.Namespace(**{**vars(args), "batch": n}))
    load_start = c.loadavg()
    rotation = iter(range(1, 1 << 30))

    def forward(model, **kwargs):
        def run():
            with torch.no_grad():
                return model(input_ids=ids, **kwargs).logits
        return run

    def new_mix():
        k = next(rotation) % n
        with torch.no_grad():
            return models["lorakit new mix"](input_ids=ids, adapter_names=names[k:] + names[:k]).logits

    fns = {
        "base (no adapters)": forward(models["base (no adapters)"]),
        "lorakit mixed": forward(models["lorakit"], adapter_names=names),
        "lorakit mixed, new mix": new_mix,
        "lorakit single": forward(models["lorakit"]),
    }
    if "PEFT" in models:
        fns |= {"PEFT mixed": forward(models["PEFT"], adapter_names=names), "PEFT single": forward(models["PEFT"])}

    # One call of each variant (the warm-up) doubles as the check: mixed rows against each row alone.
    diffs = {}
    single = fns["lorakit single"]()
    for name in ("base (no adapters)", "PEFT single"):
        if name in fns:
            diffs[name] = (fns[name]() - single).abs().max().item()
    diffs["lorakit single"] = 0.0
    del single
    mixed = {name: fns[name]() for name in ("lorakit mixed", "PEFT mixed") if name in fns}
    fns["lorakit mixed, new mix"]()
    diffs |= dict.fromkeys(mixed, 0.0)
    lk = models["lorakit"]
    for row, adapter in enumerate(names):
        lk.set_active(adapter)
        with torch.no_grad():
            alone = lk(input_ids=ids[row:row + 1]).logits[0]
        for name, out in mixed.items():
            diffs[name] = max(diffs[name], (out[row] - alone).abs().max().item())
    lk.set_active(names[0])
    del mixed
    diffs["lorakit mixed, new mix"] = diffs["lorakit mixed"]  # same code, other row order (checked by the tests)

    wall, cpu = c.round_robin(fns, rounds, 0)
    own = {"lorakit mixed": "lorakit single", "lorakit mixed, new mix": "lorakit single",
           "PEFT mixed": "PEFT single"}
    rows = []
    for name in fns:
        rows.append([
            name, f"{c.median_ms(wall[name]):.0f}", f"{c.median_ms(cpu[name]):.0f}",
            f"{c.paired_ratio(cpu, name, 'base (no adapters)'):.3f}",
            f"{c.paired_ratio(cpu, name, own[name]):.3f}" if name in own else "—",
            f"{c.paired_ratio(wall, name, own[name]):.3f}" if name in own else "—",
            f"{diffs[name]:.1e}",
        ])
    extra = ""
    if "lorakit mixed" in fns:
        extra = (f"; lorakit new mix / steady mix ({c.CLOCK}): "
                 f"{c.paired_ratio(cpu, 'lorakit mixed, new mix', 'lorakit mixed'):.3f}")
    return "\n".join([
        f"#### {n} adapters: {n} rows × {args.seq} tokens",
        "",
        f"- load average at start: {load_start}, at end: {c.loadavg()}; {rounds} interleaved rounds after one "
        f"call of each variant; ratios are medians of per-round ratios{extra}",
        "- logit diff: mixed variants against each row run alone through its adapter (lorakit, one row at a "
        "time); single variants and the base against lorakit single",
        "",
        c.table(["variant", "median wall ms", f"median {c.CLOCK} ms", f"× base ({c.CLOCK})",
                 f"× own single ({c.CLOCK})", "× own single (wall)", "max abs logit diff"], rows),
    ])


if __name__ == "__main__":
    main()
