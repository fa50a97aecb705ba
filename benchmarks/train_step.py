"""Training-step time and memory of every method, lorakit against HF PEFT, and QLoRA's NF4 base.

Same random Llama-style model as the other benchmarks (hidden 768, 6 layers, vocab 32000);
r=16, alpha=32 on every linear layer but the LM head; the B side random and equal in both
libraries (PEFT's tensors are copied from lorakit's). One step = forward with the causal-LM loss,
backward, AdamW step, zero_grad(set_to_none=True). Default input 4 × 256 tokens, fp32.

Variants (``--variants``, comma-separated groups):

- ``base``: the bare frozen base, forward + backward (every parameter frozen, the input
  embeddings' output requires grad, so the backward runs through every layer): the floor.
- ``lora``, ``dora``, ``vera``, ``lora-fa``: lorakit and PEFT. PEFT has no LoRA-FA class: its
  LoRA with every ``lora_A`` frozen is LoRA-FA, and that is what runs.
- ``delta-lora``: lorakit only (PEFT has none), compared with lorakit LoRA; ``DeltaLoRA`` with
  ``start_step=0`` so the W update runs after every optimizer step.
- ``qlora``: LoRA on a bf16 base and on an NF4 (double-quantised, bf16 compute) base, lorakit
  and PEFT. lorakit quantises with ``lorakit.quantize.quantize_model``; PEFT's base is loaded the
  standard way, ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` from a bf16
  checkpoint of the same model (``prepare_model_for_kbit_training`` is not called: it would cast
  the bf16 parts to fp32 and turn on gradient checkpointing). Its own interleaved run with
  ``--qlora-rounds`` (NF4 on a CPU is slow).

Time: every variant of a run is its own model copy and optimizer, run round-robin in one
process after warm-up; ratios are medians of per-round ratios. Memory: each variant again in a
fresh subprocess (see _common.step_memory).

    .venv/bin/python benchmarks/train_step.py [--batch 4 --seq 256 --rounds 5 --variants lora,dora ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import _common as c
import torch

import lorakit

GROUPS = ("base", "lora", "dora", "vera", "lora-fa", "delta-lora", "qlora")
BASE = "bare frozen base (fwd + bwd)"
QLORA = {  # name -> (library, base precision)
    "lorakit LoRA, bf16 base": ("lorakit", "bf16"),
    "lorakit LoRA, NF4 base": ("lorakit", "nf4"),
    "PEFT LoRA, bf16 base": ("peft", "bf16"),
    "PEFT LoRA, NF4 base": ("peft", "nf4"),
}


def fp32_variants(groups: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (library, method) of the fp32 run, in table order."""
    out: dict[str, tuple[str, str]] = {}
    if "base" in groups:
        out[BASE] = ("base", "")
    for method in ("lora", "dora", "vera", "lora-fa"):
        if method in groups:
            out[f"lorakit {method}"] = ("lorakit", method)
            out[f"PEFT {method}"] = ("peft", method)
    if "delta-lora" in groups:
        out["lorakit lora"] = ("lorakit", "lora")  # its reference
        out["lorakit delta-lora"] = ("lorakit", "delta-lora")
    return out


def reference(name: str, lib: str, method: str) -> str | None:
    if lib == "lorakit":
        return "lorakit lora" if method == "delta-lora" else f"PEFT {method}"
    return None


def optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)


def build_fp32(base, args, lib: str, method: str):
    """(model, step) of one fp32 variant; ``base`` is not changed."""
    ids = c.inputs(args)
    if lib == "base":
        model = copy.deepcopy(base).train().requires_grad_(False)
        # What HF's enable_input_require_grads does: the backward then runs through every layer.
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        return model, c.train_stepper(model, None, ids)
    am = c.lorakit_model(base, args, "lora" if method == "delta-lora" else method)
    model = am if lib == "lorakit" else c.peft_model_like(base, am, args, method)
    model.train()
    opt = optimizer(model, args)
    rule = lorakit.DeltaLoRA(am, c=2.0, start_step=0).step if method == "delta-lora" else None
    return model, c.train_stepper(model, opt, ids, after_step=rule)


def bf16_base(base):
    return copy.deepcopy(base).to(torch.bfloat16)


def peft_nf4_base(base_bf16):
    """PEFT's usual QLoRA base: the model saved in bf16 and loaded through BitsAndBytesConfig."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as directory:
        base_bf16.save_pretrained(directory)
        return LlamaForCausalLM.from_pretrained(directory, quantization_config=quant, dtype=torch.bfloat16,
                                                device_map=str(next(base_bf16.parameters()).device))


def build_qlora(base_bf16, args, lib: str, precision: str):
    """(model, step) of one QLoRA variant: LoRA on ``base_bf16`` itself or on an NF4 copy of it."""
    from lorakit.quantize import quantize_model

    if precision == "nf4":
        base = quantize_model(copy.deepcopy(base_bf16), "nf4", compute_dtype=torch.bfloat16)
    else:
        base = copy.deepcopy(base_bf16)
    am = c.lorakit_model(base, args, "lora", copy_base=False)
    if lib == "lorakit":
        model = am
    else:
        theirs = peft_nf4_base(base_bf16) if precision == "nf4" else copy.deepcopy(base_bf16)
        model = c.peft_model_like(theirs, am, args, "lora", copy_base=False)
        del am, base
    model.train()
    return model, c.train_stepper(model, optimizer(model, args), c.inputs(args))


# -- memory, one variant per fresh process ------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    import bitsandbytes  # noqa: F401  (imported before the bare-process RSS is read)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    torch.ones(64, 64, device=args.device) @ torch.ones(64, 64, device=args.device)  # one-off allocations
    bare = c.memory_kb()
    base = c.build_base(args)
    if args.child in QLORA:
        base = bf16_base(base)
        model, step = build_qlora(base, args, *QLORA[args.child])
    else:
        model, step = build_fp32(base, args, *fp32_variants(GROUPS)[args.child])
    del base
    for _ in range(2):
        step()
    print(json.dumps(c.step_memory(model, step, bare)))


def memory(args: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    return {n: c.run_child(__file__, [f"--child={n}", *c.size_flags(args, "lr")]) for n in names}


def timed(models: dict, args: argparse.Namespace, rounds: int):
    """Round-robin times; each variant's first step (also a warm-up) gives its loss at step 1."""
    steps = {name: step for name, (_, step) in models.items()}
    first_loss = {name: step() for name, step in steps.items()}
    wall, cpu = c.round_robin(steps, rounds, args.warmup - 1)
    return wall, cpu, first_loss


def fp32_run(args: argparse.Namespace, groups: list[str]) -> None:
    variants = fp32_variants(groups)
    base = c.build_base(args)
    models = {name: build_fp32(base, args, lib, method) for name, (lib, method) in variants.items()}
    del base
    wall, cpu, first_loss = timed(models, args, args.rounds)
    del models
    mem = {} if args.no_memory else memory(args, list(variants))
    print(f"- {args.rounds} interleaved rounds after {args.warmup} warm-up steps; ratios are medians of per-round "
          f"ratios; load average at end: {c.loadavg()}")
    print()
    headers = ["variant", "median wall ms/step", f"median {c.CLOCK} ms/step", f"× bare base fwd+bwd ({c.CLOCK})",
               "reference", f"× reference ({c.CLOCK})", "× reference (wall)"]
    if mem:
        headers += ["step peak RSS above pre-step, MiB", "peak RSS above bare process, MiB", "saved for backward, MiB"]
    headers.append("loss at step 1")
    rows = []
    for name, (lib, method) in variants.items():
        ref = reference(name, lib, method)
        row = [name, f"{c.median_ms(wall[name]):.0f}", f"{c.median_ms(cpu[name]):.0f}",
               f"{c.paired_ratio(cpu, name, BASE):.3f}" if BASE in cpu else "—", ref or "—",
               f"{c.paired_ratio(cpu, name, ref):.3f}" if ref else "—",
               f"{c.paired_ratio(wall, name, ref):.3f}" if ref else "—"]
        if mem:
            row += [f"{mem[name][k]:.0f}" for k in ("peak_mib", "total_mib", "saved_mib")]
        row.append(f"{first_loss[name]:.6f}")
        rows.append(row)
    print(c.table(headers, rows))


def qlora_run(args: argparse.Namespace) -> None:
    base = bf16_base(c.build_base(args))
    models = {name: build_qlora(base, args, lib, precision) for name, (lib, precision) in QLORA.items()}
    del base
    wall, cpu, first_loss = timed(models, args, args.qlora_rounds)
    del models
    mem = {} if args.no_memory else memory(args, list(QLORA))
    print(f"- QLoRA: {args.qlora_rounds} interleaved rounds after {args.warmup} warm-up steps; "
          f"load average at end: {c.loadavg()}")
    print()
    headers = ["variant", "median wall ms/step", f"median {c.CLOCK} ms/step", f"× own bf16 base ({c.CLOCK})"]
    if mem:
        headers += ["step peak RSS above pre-step, MiB", "peak RSS above bare process, MiB",
                    "× own bf16 base (peak RSS above bare process)"]
    headers.append("loss at step 1")
    rows = []
    for name, (lib, _) in QLORA.items():
        own = f"{'lorakit' if lib == 'lorakit' else 'PEFT'} LoRA, bf16 base"
        row = [name, f"{c.median_ms(wall[name]):.0f}", f"{c.median_ms(cpu[name]):.0f}",
               f"{c.paired_ratio(cpu, name, own):.3f}"]
        if mem:
            row += [f"{mem[name]['peak_mib']:.0f}", f"{mem[name]['total_mib']:.0f}",
                    f"{mem[name]['total_mib'] / mem[own]['total_mib']:.3f}"]
        row.append(f"{first_loss[name]:.6f}")
        rows.append(row)
    print(c.table(headers, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.model_args(parser, batch=4, seq=256)
    parser.add_argument("--variants", default=",".join(GROUPS), help=f"comma-separated groups of {', '.join(GROUPS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--qlora-rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant (the loss check is one)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    c.set_threads(args)
    if args.child:
        child(args)
        return
    groups = [g.strip() for g in args.variants.split(",") if g.strip()]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown variant groups {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    print(c.header(f"Training step: every method vs HF PEFT (r={args.rank}, all-linear)"))
    print(f"- model: Llama-style, hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
          f"{args.heads} heads, vocab {args.vocab}; input {args.batch} × {args.seq} tokens, causal-LM loss, "
          f"AdamW(lr={args.lr}); base in {args.dtype} unless the variant says otherwise, adapters in float32")
    if c.CLOCK == "GPU":
        print("- on the GPU the memory columns are CUDA memory allocated (torch.cuda.max_memory_allocated), not RSS")
    if set(groups) - {"qlora"}:
        fp32_run(args, groups)
    if "qlora" in groups:
        if set(groups) - {"qlora"}:
            print()
        qlora_run(args)


if __name__ == "__main__":
    main()
