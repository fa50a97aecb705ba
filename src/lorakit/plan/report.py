"""A plan as text (a table per device, FLOPs per token, the recommendation) or as JSON."""

from __future__ import annotations

from typing import Any

import torch

from lorakit.plan.memory import CONTEXT_BYTES, FRAGMENTATION, GiB
from lorakit.plan.memory import format_bytes as _gib
from lorakit.plan.planner import Plan

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _flops(n: float) -> str:
    return f"{n / 1e9:.2f} GFLOP" if n >= 1e9 else f"{n / 1e6:.2f} MFLOP"


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def describe(plan: Plan) -> str:
    """The plan as the command prints it."""
    request, train = plan.request, plan.request.train
    off, on = plan.given(False), plan.given(True)
    base_kind = "NF4 (bitsandbytes, double quantised)" if train.quantize == "nf4" else DTYPE_NAMES[request.dtype]
    unit = "GPU" if request.device_type == "cuda" else "CPU"
    where = (f"{request.devices} {unit}{'s' if request.devices > 1 else ''} of {request.device_memory / GiB:.0f} GiB"
             + (", sharded (FSDP)" if request.shard else ", data parallel" if request.devices > 1 else ""))
    method = {"full": "every weight trained", "head": "the classification head trained"}.get(
        train.method, f"{train.method} r={train.rank} on {train.targets} ({off.adapted_modules} modules)")
    lines = [
        f"lorakit plan: {request.source.name} ({train.task}), {method}",
        f"  base {base_kind}, {_count(off.static.base_params)} params; {_count(off.static.trainable_params)} "
        f"trainable; {'bf16 autocast' if request.autocast else 'no autocast'}",
        f"  step: {train.batch_size} × {request.length} tokens (--batch-size {train.batch_size}"
        + (f", --grad-accum {train.grad_accum}" if train.grad_accum > 1 else "")
        + f"): {request.rows} row{'s' if request.rows > 1 else ''} per device at once; on {where}",
        "",
        f"  {'per device':<50}{'without checkpointing':>22}{'with checkpointing':>22}",
    ]
    memory = {gc: variant.memory(request.devices, request.shard) for gc, variant in ((False, off), (True, on))}
    rows = [("base weights", "base"), ("adapter weights (fp32)" if train.method not in ("full", "head")
                                       else "adapter weights", "adapter"),
            ("gradients (trainable only)", "gradients"), ("optimizer state (AdamW: 2 moments)", "optimizer"),
            ("activations saved for backward", "activations"),
            ("step peak: activations + gradients + temporaries", "step_peak")]
    if request.shard and request.devices > 1:
        rows.append(("FSDP: gathered blocks, root weights", "gathered"))
    if request.devices > 1 and not request.shard:
        rows.append(("DDP gradient buckets", "ddp_buckets"))
    for label, key in rows:
        lines.append(f"  {label:<50}{_gib(getattr(memory[False], key)):>22}{_gib(getattr(memory[True], key)):>22}")
    usable = plan.recommendation.usable
    lines.append(f"  {'total (weights + optimizer + step peak)':<50}{_gib(memory[False].total):>22}"
                 f"{_gib(memory[True].total):>22}")
    lines.append(f"  {'fits in ' + _gib(usable) + ' usable?':<50}{_yes(memory[False].total <= usable):>22}"
                 f"{_yes(memory[True].total <= usable):>22}")
    lines.append(f"  {'FLOPs per token (forward + backward)':<50}{_flops(off.flops_per_token()):>22}"
                 f"{_flops(on.flops_per_token()):>22}")
    lines += [
        "",
        f"recommendation: {plan.recommendation.text}",
        f"  usable = {request.device_memory / GiB:.2f} GiB − {100 * FRAGMENTATION:.0f}% (allocator fragmentation)"
        f" − {CONTEXT_BYTES / GiB:.0f} GiB ({'CUDA context' if request.device_type == 'cuda' else 'process'}) "
        f"= {_gib(usable)}",
        "  Measured on a shape-only model (no weights read): every tensor the step makes, live at its peak.",
    ]
    return "\n".join(lines)


def _yes(fits: bool) -> str:
    return "yes" if fits else "no"


def as_json(plan: Plan) -> dict[str, Any]:
    """Every figure of the plan, in bytes and FLOPs."""
    request, train = plan.request, plan.request.train
    variants = []
    for (checkpointing, nf4), variant in plan.variants.items():
        variants.append({
            "gradient_checkpointing": checkpointing, "quantize": "nf4" if nf4 else "none",
            "rows": variant.step.rows, "length": variant.step.length,
            "static": dict(vars(variant.static)), "blocks": dict(vars(variant.blocks)),
            "activations": variant.step.activations, "saved_for_backward": variant.step.saved,
            "optimizer_state": variant.step.optimizer_state, "step_peak": variant.step.peak(),
            "flops_per_micro_batch": variant.step.flops, "flops_per_token": variant.flops_per_token(),
            "per_device": variant.memory(request.devices, request.shard).as_dict(),
        })
    return {
        "model": request.source.name, "task": train.task, "method": train.method, "rank": train.rank,
        "targets": train.targets, "dtype": DTYPE_NAMES[request.dtype], "bf16_autocast": request.autocast,
        "batch_size": train.batch_size, "grad_accum": train.grad_accum, "max_length": request.length,
        "rows_per_device": request.rows, "devices": request.devices, "device_memory": request.device_memory,
        "shard": request.shard, "device_type": request.device_type,
        "headroom": {"context_bytes": CONTEXT_BYTES, "fragmentation": FRAGMENTATION},
        "variants": variants, "recommendation": plan.recommendation.as_dict(),
    }
