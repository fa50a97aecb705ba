"""Training-step time and memory of LoRA and DoRA, lorakit against PEFT.

Same random Llama-style model as forward_latency.py; r=16, alpha=32 on every linear layer but
the LM head; lora_B random and equal in both libraries. One step = forward with the causal-LM
loss, backward, AdamW step, zero_grad. Default input 4 × 128 tokens (not 16 × 128: a step on
this 2-core CPU takes seconds).

Time: the four variants, each its own model copy and optimizer, run round-robin in one process
after warm-up steps; ratios are medians of per-round ratios.

Memory: each variant runs again in a fresh subprocess with glibc told to return every freed
block above 64 KiB to the OS at once (MALLOC_MMAP_THRESHOLD_), so resident memory follows live
tensors. After two warm-up steps (optimizer state exists) the peak-RSS mark is reset
(/proc/self/clear_refs), and one step's peak RSS above the RSS just before it is reported, with
the bytes autograd saved for backward during that step (activations only: model and adapter
parameters excluded, each storage counted once).

    .venv/bin/python benchmarks/dora_training.py [--batch 4 --rounds 8 --threads 1 ...]
"""

from __future__ import annotations

import argparse
import json

import _common as c
import torch

VARIANTS = {
    "lorakit LoRA": ("lorakit", "lora"),
    "lorakit DoRA": ("lorakit", "dora"),
    "PEFT LoRA": ("peft", "lora"),
    "PEFT DoRA": ("peft", "dora"),
}


def build(base, args, lib: str, method: str):
    am = c.lorakit_model(base, args, method)
    model = am if lib == "lorakit" else c.peft_model_like(base, am, args, method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=args.lr)


def child(args: argparse.Namespace) -> None:
    """Measure one variant's memory in this (fresh) process and print it as JSON."""
    lib, method = VARIANTS[args.child]
    base = c.build_base(args)
    model, opt = build(base, args, lib, method)
    del base
    step = c.train_stepper(model, opt, c.inputs(args))
    for _ in range(2):
        step()
    print(json.dumps(c.step_memory(model, step)))


def measure_memory(args: argparse.Namespace, name: str) -> dict:
    return c.run_child(__file__, [f"--child={name}", *c.size_flags(args, "lr")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.model_args(parser, batch=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    c.set_threads(args)
    if args.child:
        child(args)
        return
    print(c.header(f"Training step: LoRA vs DoRA (r={args.rank}, all-linear)"))

    base = c.build_base(args)
    ids = c.inputs(args)
    steps, first_loss = {}, {}
    for name, (lib, method) in VARIANTS.items():
        model, opt = build(base, args, lib, method)
        steps[name] = c.train_stepper(model, opt, ids)
        first_loss[name] = steps[name]()  # also the first warm-up step
    del base
    wall, cpu = c.round_robin(steps, args.rounds, args.warmup - 1)
    memory = {} if args.no_memory else {name: measure_memory(args, name) for name in VARIANTS}

    rows = []
    for name in VARIANTS:
        own = "lorakit LoRA" if VARIANTS[name][0] == "lorakit" else "PEFT LoRA"
        row = [
            name, f"{c.median_ms(wall[name]):.0f}", f"{c.median_ms(cpu[name]):.0f}",
            f"{c.paired_ratio(cpu, name, own):.3f}", f"{c.paired_ratio(wall, name, own):.3f}",
            f"{c.paired_ratio(cpu, name, 'lorakit LoRA'):.3f}",
        ]
        if memory:
            row += [f"{memory[name]['peak_mib']:.0f}", f"{memory[name]['saved_mib']:.0f}"]
        row.append(f"{first_loss[name]:.6f}")
        rows.append(row)
    print(f"- model: Llama-style, hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
          f"{args.heads} heads, vocab {args.vocab}; input {args.batch} × {args.seq} tokens, fp32, "
          f"causal-LM loss, AdamW(lr={args.lr})")
    print(f"- {args.rounds} interleaved rounds after {args.warmup} warm-up steps; ratios are medians of per-round "
          f"ratios; load average at end: {c.loadavg()}")
    print()
    headers = ["variant", "median wall ms/step", "median CPU ms/step", "× own LoRA (CPU)", "× own LoRA (wall)",
               "× lorakit LoRA (CPU)"]
    if memory:
        headers += ["step peak RSS above pre-step, MiB", "saved for backward, MiB"]
    headers.append("loss at step 1")
    print(c.table(headers, rows))


if __name__ == "__main__":
    main()
