"""Mixed-adapter batches: every row of a batch runs through its own adapter (or the bare base).

Per layer, the factors of every adapter on the layer are stacked, ranks padded with zeros
(exact) and the scaling folded into B; slot 0 is all zeros and stands for the base. A row's
update is then a gather plus two batched matrix products, accumulated into the base output:

    y = base(x) + bmm(bmm(x, A[ids]ᵀ), B[ids]ᵀ)

VeRA folds exactly into (d⊙A, b⊙B); DoRA adds a per-row output scale m/||W + sBA|| (1 for rows
without DoRA). The stack does not depend on the batch's mix, so a server whose every batch is a
new mix (continuous batching) copies nothing per batch. A slot is rewritten when its adapter's
tensors change (their ``_version``: hot swap, training, loading); a deleted adapter's slot is
reused by the next one added; the stack grows (by a quarter) only when every slot is taken.
Rows are gathered up to the largest rank in the batch, so a wide adapter loaded elsewhere
costs nothing to batches that do not use it. Stacks hold copies without autograd history:
mixed batches are an inference path (gradients do not reach the adapters through them).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.kinds import Conv1DKind, EmbeddingKind, LinearKind
from lorakit.methods import DoRA
from lorakit.methods.base import AdapterMethod

BASE = "base"  # the name that selects the bare base model for a row
MIXABLE_KINDS = (LinearKind, Conv1DKind, EmbeddingKind)


@dataclass
class Stack:
    """Per-layer stacked factors of the layer's adapters; slot 0 is the base (all zeros)."""

    A: torch.Tensor  # (slots, R, in)
    B: torch.Tensor  # (slots, out, R), scaling folded in
    scale: torch.Tensor | None  # (slots, out): DoRA's m / ||W + sBA||, 1 elsewhere; None without DoRA
    slot_of: dict[str, int] = field(default_factory=dict)  # adapter name → slot
    keys: dict[int, tuple] = field(default_factory=dict)  # slot → adapter_key its values were built from
    ranks: list[int] = field(default_factory=list)  # rank written in each slot (0: empty)
    batch: tuple | None = None  # (the batch it was computed for, rows as slots, largest rank of those rows)

    def drop(self, name: str) -> None:
        """Forget ``name``; its slot goes to the next adapter added (no row can name it meanwhile)."""
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.keys.pop(slot, None)
            self.ranks[slot] = 0
        self.batch = None

    def rename(self, old: str, new: str) -> None:
        if old in self.slot_of:
            self.slot_of[new] = self.slot_of.pop(old)
        self.batch = None


def adapter_key(method: AdapterMethod, base_layer: nn.Module) -> tuple:
    """Changes whenever the adapter's values may have changed (hot swap, training, loading, and
    ``.to()``, which swaps a tensor's storage without bumping its version)."""
    tensors = _tensors(method)
    versions = (id(method), *map(_VERSION, tensors), *map(torch.Tensor.data_ptr, tensors))
    if isinstance(method, DoRA):  # its row scale reads the base weight too
        versions += (base_layer.weight._version,)
    return versions


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers, submodules included; ``Module.parameters()`` costs several times
    more, and this runs for every adapter of a batch on every layer at every decoding step."""
    found = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    for child in module._modules.values():
        if child is not None and (child._parameters or child._buffers or child._modules):  # not dropout
            found += _tensors(child)
    return found


_VERSION = operator.attrgetter("_version")


def empty_stack(slots: int, rank: int, kind, base_layer: nn.Module, dtype: torch.dtype, dora: bool) -> Stack:
    device = base_layer.weight.device
    return Stack(
        A=torch.zeros(slots, rank, kind.in_features, dtype=dtype, device=device),
        B=torch.zeros(slots, kind.out_features, rank, dtype=dtype, device=device),
        scale=torch.ones(slots, kind.out_features, dtype=torch.float32, device=device) if dora else None,
        ranks=[0] * slots,
    )


@torch.no_grad()
def updated_stack(stack: Stack | None, names: tuple[str, ...], adapters: nn.ModuleDict, kind,
                  base_layer: nn.Module) -> Stack:
    """``stack`` with every adapter of ``names`` on this layer written and current.

    Only slots whose adapter changed are rewritten. A new stack (all of the layer's adapters) is
    built when there is none, when an adapter needs a larger rank or another dtype, when DoRA
    scales appear, or when the base moved to another device.
    """
    if stack is not None and stack.A.device != base_layer.weight.device:
        stack = None
    present = [n for n in names if n in adapters]
    todo = [n for n in present if stack is None or n not in stack.slot_of
            or stack.keys.get(stack.slot_of[n]) != adapter_key(adapters[n], base_layer)]
    if not todo:
        return stack
    factors = {n: adapters[n].factors() for n in todo}
    dora = any(isinstance(adapters[n], DoRA) for n in todo)
    if (stack is None or max(a.shape[0] for a, _ in factors.values()) > stack.A.shape[1]
            or any(a.dtype != stack.A.dtype for a, _ in factors.values()) or (dora and stack.scale is None)):
        return _rebuilt(adapters, kind, base_layer)
    free = [s for s in range(1, len(stack.ranks)) if s not in stack.keys]
    new = [n for n in todo if n not in stack.slot_of]
    if len(new) > len(free):
        stack = _grown(stack, len(stack.ranks) + max(len(new) - len(free), len(stack.ranks) // 4))
        free = [s for s in range(1, len(stack.ranks)) if s not in stack.keys]
    for n in new:
        stack.slot_of[n] = free.pop(0)
    for n in todo:
        _write(stack, stack.slot_of[n], adapters[n], factors[n], base_layer)
    stack.batch = None
    return stack


def _rebuilt(adapters: nn.ModuleDict, kind, base_layer: nn.Module) -> Stack:
    """A stack of every adapter on the layer (slot i+1 is the i-th)."""
    factors = {n: m.factors() for n, m in adapters.items()}
    rank = max([a.shape[0] for a, _ in factors.values()] or [1])
    dtype = next((a.dtype for a, _ in factors.values()), torch.float32)
    dora = any(isinstance(m, DoRA) for m in adapters.values())
    stack = empty_stack(len(factors) + 1, rank, kind, base_layer, dtype, dora)
    for slot, (n, pair) in enumerate(factors.items(), start=1):
        stack.slot_of[n] = slot
        _write(stack, slot, adapters[n], pair, base_layer)
    return stack


def _grown(stack: Stack, slots: int) -> Stack:
    """The same stack with empty slots added at the end (one copy, no per-adapter work)."""
    extra = slots - stack.A.shape[0]
    scale = stack.scale
    return Stack(
        A=torch.cat([stack.A, stack.A.new_zeros(extra, *stack.A.shape[1:])]),
        B=torch.cat([stack.B, stack.B.new_zeros(extra, *stack.B.shape[1:])]),
        scale=None if scale is None else torch.cat([scale, scale.new_ones(extra, scale.shape[1])]),
        slot_of=stack.slot_of, keys=stack.keys, ranks=stack.ranks + [0] * extra,
    )


@torch.no_grad()
def _write(stack: Stack, slot: int, method: AdapterMethod, pair: tuple[torch.Tensor, torch.Tensor],
           base_layer: nn.Module) -> None:
    a, b = pair
    r = a.shape[0]
    stack.A[slot, :r] = a
    stack.A[slot, r:] = 0
    stack.B[slot, :, :r] = b
    stack.B[slot, :, r:] = 0
    if stack.scale is not None:
        if isinstance(method, DoRA):
            stack.scale[slot] = method.lora_magnitude_vector / method.weight_norm(base_layer)
        else:
            stack.scale[slot] = 1
    stack.ranks[slot] = r
    stack.keys[slot] = adapter_key(method, base_layer)


def batch_rows(stack: Stack, mixed: tuple[tuple[str, ...], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The stack slot of each row of the batch, and the largest rank among them (cached per batch)."""
    if stack.batch is not None and stack.batch[0] is mixed:
        return stack.batch[1], stack.batch[2]
    names, rows = mixed
    slots = [0, *(stack.slot_of.get(n, 0) for n in names)]  # rows hold 0 for the base, i+1 for names[i]
    lookup = torch.tensor(slots, dtype=torch.long, device=rows.device)
    result = (lookup[rows], max(stack.ranks[s] for s in slots))
    stack.batch = (mixed, *result)
    return result


def mixed_forward(
    kind, base_layer: nn.Module, out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, rank: int, stack: Stack,
    *, inplace: bool = False,
) -> torch.Tensor:
    """The layer output when row b uses stack slot rows[b] (its factors up to ``rank``).

    ``inplace=True`` says the caller owns ``out``: the update is accumulated into it.
    """
    if not isinstance(kind, MIXABLE_KINDS):
        raise NotImplementedError(f"mixed-adapter batches are not supported on {kind.name} layers")
    if x.shape[0] != rows.shape[0]:
        raise ValueError(f"mixed batch: {x.shape[0]} rows in the input but {rows.shape[0]} adapter names")
    batch = x.shape[0]
    B_rows = stack.B[:, :, :rank].index_select(0, rows).to(out.dtype)  # (batch, out, R)
    if isinstance(kind, EmbeddingKind):
        # Row b, token t reads column x[b, t] of its adapter's A.
        h = stack.A[rows[:, None], :rank, x.reshape(batch, -1)]  # (batch, L, R)
    else:
        A_rows = stack.A[:, :rank].index_select(0, rows)  # (batch, R, in)
        h = torch.bmm(x.reshape(batch, -1, x.shape[-1]), A_rows.transpose(1, 2).to(x.dtype))
    h = h.to(out.dtype)
    # One GEMM accumulating into the output, as the single-adapter path does (kinds.add_up_);
    # under autograd not into a view, whose backward would clone the whole output gradient.
    if inplace and out.dim() == 3 and not (torch.is_grad_enabled() and out._is_view()):
        total = out.baddbmm_(h, B_rows.transpose(1, 2))
    else:
        total = out + torch.bmm(h, B_rows.transpose(1, 2)).reshape(out.shape)
    if stack.scale is None:
        return total
    scale = stack.scale[rows].to(out.dtype).reshape(batch, *([1] * (out.dim() - 2)), -1)
    bias = kind.bias(base_layer)
    if bias is None:
        return scale * total
    return scale * (total - bias) + bias


def embedding_check(kind, base_layer: nn.Module) -> None:
    """Mixed batches read A by token id; options that change lookups are not supported there."""
    if isinstance(kind, EmbeddingKind) and (base_layer.max_norm is not None):
        raise NotImplementedError("mixed batches on embeddings with max_norm are not supported")


__all__ = ["BASE", "Stack", "adapter_key", "batch_rows", "embedding_check", "mixed_forward", "updated_stack"]
