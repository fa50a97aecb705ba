"""Mixed-adapter batches: every row of a batch runs through its own adapter (or the bare base).

Per layer, the factors of the adapters a batch uses are stacked once, ranks padded with zeros
(exact) and the scaling folded into B; slot 0 is all zeros and stands for the base. A row's
update is then a gather plus two batched matrix products:

    y = base(x) + bmm(bmm(x, A[ids]ᵀ), B[ids]ᵀ)

VeRA folds exactly into (d⊙A, b⊙B); DoRA adds a per-row output scale m/||W + sBA|| (1 for rows
without DoRA). Stacks are cached per layer and rebuilt only when the set of adapters in a batch
or any of their tensors changes, so a steady mix costs no copying.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.kinds import Conv1DKind, EmbeddingKind, LinearKind
from lorakit.methods import DoRA
from lorakit.methods.base import AdapterMethod

BASE = "base"  # the name that selects the bare base model for a row
MIXABLE_KINDS = (LinearKind, Conv1DKind, EmbeddingKind)


@dataclass
class Stack:
    """Per-layer stacked factors for the adapters of one batch; slot 0 is the base."""

    key: tuple
    A: torch.Tensor  # (slots, R, in)
    B: torch.Tensor  # (slots, out, R), scaling folded in
    scale: torch.Tensor | None  # (slots, out): DoRA's m / ||W + sBA||, 1 elsewhere; None without DoRA


def build_stack(
    names: tuple[str, ...], adapters: nn.ModuleDict, kind, base_layer: nn.Module, key: tuple
) -> Stack:
    """Stack the factors of ``names`` (slot i+1 is names[i]; a name absent from this layer is zeros)."""
    present = [adapters[n] if n in adapters else None for n in names]  # noqa: SIM401 (ModuleDict has no get)
    factors = [m.factors() if m is not None else None for m in present]
    rank = max([a.shape[0] for a, _ in filter(None, factors)] or [1])
    in_f, out_f = kind.in_features, kind.out_features
    like = next((a for a, _ in filter(None, factors)), None)
    dtype = like.dtype if like is not None else torch.float32
    device = base_layer.weight.device
    A = torch.zeros(len(names) + 1, rank, in_f, dtype=dtype, device=device)
    B = torch.zeros(len(names) + 1, out_f, rank, dtype=dtype, device=device)
    scale = None
    if any(isinstance(m, DoRA) for m in present):
        scale = torch.ones(len(names) + 1, out_f, dtype=torch.float32, device=device)
    with torch.no_grad():
        for slot, (method, pair) in enumerate(zip(present, factors, strict=True), start=1):
            if method is None:
                continue
            a, b = pair
            A[slot, : a.shape[0]] = a
            B[slot, :, : b.shape[1]] = b
            if isinstance(method, DoRA):
                scale[slot] = method.lora_magnitude_vector / method.weight_norm(base_layer)
    return Stack(key, A, B, scale)


def stack_key(names: tuple[str, ...], adapters: nn.ModuleDict) -> tuple:
    """Changes whenever the adapter set or any of their tensors changes (hot swap, training)."""
    versions = []
    for n in names:
        if n in adapters:
            m: AdapterMethod = adapters[n]
            versions.append((id(m), *(t._version for t in m.parameters()), *(t._version for t in m.buffers())))
    return (names, tuple(versions))


def mixed_forward(
    kind, base_layer: nn.Module, out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, stack: Stack
) -> torch.Tensor:
    """The layer output when row b uses stack slot rows[b]."""
    if not isinstance(kind, MIXABLE_KINDS):
        raise NotImplementedError(f"mixed-adapter batches are not supported on {kind.name} layers")
    if x.shape[0] != rows.shape[0]:
        raise ValueError(f"mixed batch: {x.shape[0]} rows in the input but {rows.shape[0]} adapter names")
    batch = x.shape[0]
    A_rows, B_rows = stack.A[rows], stack.B[rows]  # (batch, R, in), (batch, out, R)
    if isinstance(kind, EmbeddingKind):
        # Row b, token t reads column x[b, t] of its adapter's A.
        h = stack.A[rows[:, None], :, x.reshape(batch, -1)]  # (batch, L, R)
    else:
        h = torch.bmm(x.reshape(batch, -1, x.shape[-1]), A_rows.transpose(1, 2).to(x.dtype))
    update = torch.bmm(h, B_rows.transpose(1, 2).to(h.dtype)).reshape(out.shape)
    if stack.scale is None:
        return out + update.to(out.dtype)
    scale = stack.scale[rows].to(out.dtype).reshape(batch, *([1] * (out.dim() - 2)), -1)
    bias = kind.bias(base_layer)
    if bias is None:
        return scale * (out + update.to(out.dtype))
    return scale * (out - bias + update.to(out.dtype)) + bias


def embedding_check(kind, base_layer: nn.Module) -> None:
    """Mixed batches read A by token id; options that change lookups are not supported there."""
    if isinstance(kind, EmbeddingKind) and (base_layer.max_norm is not None):
        raise NotImplementedError("mixed batches on embeddings with max_norm are not supported")


__all__ = ["BASE", "Stack", "build_stack", "embedding_check", "mixed_forward", "stack_key"]
