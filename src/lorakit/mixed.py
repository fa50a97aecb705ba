"""Mixed-adapter batches: every row of a batch runs through its own adapter (or the bare base).

Per layer, the factors of every adapter on the layer are stacked, ranks padded with zeros
(exact) and the scaling folded into B; slot 0 is all zeros and stands for the base. A row's
update is then a gather plus two batched matrix products, accumulated into the base output:

    y = base(x) + bmm(bmm(x, A[ids]ᵀ), B[ids]ᵀ)

At one token per row (a decoding step) the gather's copy would be most of the work, so both
products read the stacked rows in place as weighted sums instead (``embedding_bag``).

What goes into the stack is what each method declares (:mod:`lorakit.methods.base`): its
``factors()`` (VeRA folds exactly into (d⊙A, b⊙B)) and its ``output_scale`` (DoRA's per-row
m/||W + sBA||; 1 for rows of other methods). A method that is not ``mixable`` (its update is no
pair of factors) gets no slot: its rows read the zero slot, then run through the method's own
``forward`` on just those rows (:func:`own_rows_forward`), so it never breaks a batch for the
adapters beside it. The stack does not depend on the batch's mix, so a server whose every batch is a
new mix (continuous batching) copies nothing per batch. A slot is rewritten when its adapter's
tensors change (their ``_version``: hot swap, training, loading); a deleted adapter's slot is
reused by the next one added; the stack grows (by a quarter) only when every slot is taken.
Rows are gathered up to the largest rank in the batch, so a wide adapter loaded elsewhere
costs nothing to batches that do not use it. Stacks hold copies without autograd history:
mixed batches are an inference path (gradients do not reach the adapters through them).

The per-batch work is done once for the whole model, before the forward (:func:`plan_batch`):
whether an adapter changed is first asked of the model as a whole, one version stamp per
adapter (the sums of its tensors' versions and addresses: an in-place write raises a version, a
move changes an address), so an unchanged adapter costs one comparison per layer rather than a
walk over its tensors; each layer's row → slot map is computed on the CPU and sent to the
device in one copy, so the forward itself never waits for the host.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kinds import Conv1DKind, EmbeddingKind, LinearKind
from lorakit.methods.base import AdapterMethod
from lorakit.structure import structure_generation

BASE = "base"  # the name that selects the bare base model for a row
MIXABLE_KINDS = (LinearKind, Conv1DKind, EmbeddingKind)


@dataclass
class Stack:
    """Per-layer stacked factors of the layer's adapters; slot 0 is the base (all zeros)."""

    At: torch.Tensor  # (slots, in, R): A transposed
    Bt: torch.Tensor  # (slots, R, out): B transposed, scaling folded in
    scale: torch.Tensor | None  # (slots, out): each method's output_scale (DoRA's m / ||W + sBA||), 1 elsewhere;
    # None while no adapter in the stack has one
    slot_of: dict[str, int] = field(default_factory=dict)  # adapter name → slot
    keys: dict[int, tuple] = field(default_factory=dict)  # slot → adapter_key its values were built from
    ranks: list[int] = field(default_factory=list)  # rank written in each slot (0: empty)

    def drop(self, name: str) -> None:
        """Forget ``name``; its slot goes to the next adapter added (no row can name it meanwhile)."""
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.keys.pop(slot, None)
            self.ranks[slot] = 0

    def rename(self, old: str, new: str) -> None:
        if old in self.slot_of:
            self.slot_of[new] = self.slot_of.pop(old)


@dataclass
class LayerMix:
    """A layer's mixed-batch state: its stack, which (adapter, version stamp) pairs it is known to
    be current for, and the slot map of the last batch's names (reused while neither changes)."""

    stack: Stack | None = None
    generation: int = -1  # the structure generation ``current`` belongs to
    current: dict = field(default_factory=dict)  # name → the stamp the stack is current at (or the name is not here)
    confirmed: frozenset = frozenset()  # current's items, for a subset test per batch
    unmixable: frozenset = frozenset()  # names of the adapters here that are not mixable (as of ``generation``)
    # (names, slot of each name with 0 first, largest rank among them, (adapter name, its batch slot)
    # for the batch's adapters on this layer that are not mixable)
    last: tuple | None = None

    def forget(self, name: str) -> None:
        """Adapter ``name`` left the layer. The stack holds a copy of every adapter's factors and
        deleting must give memory back: once at most half its slots are in use it goes (rebuilt,
        compact, when next needed); a hot swap (one out, one in) keeps it."""
        self.last = None
        if self.stack is not None:
            self.stack.drop(name)
            if 2 * len(self.stack.slot_of) + 1 < len(self.stack.ranks):
                self.stack = None

    def rename(self, old: str, new: str) -> None:
        self.last = None
        if self.stack is not None:
            self.stack.rename(old, new)


def adapter_key(method: AdapterMethod, base_layer: nn.Module) -> tuple:
    """Changes whenever the adapter's values may have changed (hot swap, training, loading, and
    ``.to()``, which swaps a tensor's storage without bumping its version)."""
    tensors = _tensors(method)
    versions = (id(method), *map(_VERSION, tensors), *map(torch.Tensor.data_ptr, tensors))
    if method.reads_base_weight:  # e.g. DoRA's row scale
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
_ADDRESS = torch.Tensor.data_ptr


class AdapterVersions:
    """Per model: a version stamp per adapter that changes whenever any of its tensors may have changed.

    The stamp is (generation, Σ versions, Σ addresses) over the adapter's tensors on every layer
    (and the base weight under a method that ``reads_base_weight``, such as DoRA's row scale).
    Versions only grow, so an in-place write always changes the sum; a new tensor object bumps
    the generation (:mod:`lorakit.structure`) and the lists are rebuilt.
    """

    def __init__(self) -> None:
        self.generation = -1
        self.tensors: dict[str, list[torch.Tensor]] = {}

    def of(self, names: Sequence[str], layers: Sequence) -> dict[str, tuple]:
        generation = structure_generation()
        if self.generation != generation:
            self.tensors.clear()
            self.generation = generation
        stamps = {}
        for name in names:
            flat = self.tensors.get(name)
            if flat is None:
                flat = self.tensors[name] = self._tensors_of(name, layers)
            stamps[name] = (generation, sum(map(_VERSION, flat)), sum(map(_ADDRESS, flat)))
        return stamps

    @staticmethod
    def _tensors_of(name: str, layers: Sequence) -> list[torch.Tensor]:
        flat: list[torch.Tensor] = []
        for layer in layers:
            if name not in layer.adapters:
                continue
            method = layer.adapters[name]
            flat += [t for t in _tensors(method) if t.numel()]  # an empty tensor holds no values to change
            if method.reads_base_weight:
                flat.append(layer.base_layer.weight)
        return flat


def empty_stack(slots: int, rank: int, kind, base_layer: nn.Module, dtype: torch.dtype, scaled: bool) -> Stack:
    device = base_layer.weight.device
    return Stack(
        At=torch.zeros(slots, kind.in_features, rank, dtype=dtype, device=device),
        Bt=torch.zeros(slots, rank, kind.out_features, dtype=dtype, device=device),
        scale=torch.ones(slots, kind.out_features, dtype=torch.float32, device=device) if scaled else None,
        ranks=[0] * slots,
    )


@torch.no_grad()
def updated_stack(stack: Stack | None, names: Sequence[str], adapters: nn.ModuleDict, kind,
                  base_layer: nn.Module) -> Stack | None:
    """``stack`` with every mixable adapter of ``names`` on this layer written and current.

    Only slots whose adapter changed (:func:`adapter_key`) are rewritten. A new stack (all of
    the layer's mixable adapters) is built when there is none, when an adapter needs a larger
    rank or another dtype, when output scales appear, or when the base moved to another device.
    """
    if stack is not None and stack.At.device != base_layer.weight.device:
        stack = None
    todo = [n for n in names if n in adapters and adapters[n].mixable and (
        stack is None or n not in stack.slot_of
        or stack.keys.get(stack.slot_of[n]) != adapter_key(adapters[n], base_layer))]
    return _written(stack, todo, adapters, kind, base_layer) if todo else stack


def _written(stack: Stack | None, todo: list[str], adapters: nn.ModuleDict, kind, base_layer: nn.Module) -> Stack:
    """``stack`` (or a new one) with the adapters of ``todo`` written into their slots."""
    factors = {n: adapters[n].factors() for n in todo}
    scales = {n: adapters[n].output_scale(base_layer) for n in todo}
    scaled = any(s is not None for s in scales.values())
    if (stack is None or max(a.shape[0] for a, _ in factors.values()) > stack.At.shape[2]
            or any(a.dtype != stack.At.dtype for a, _ in factors.values()) or (scaled and stack.scale is None)):
        return _rebuilt(adapters, kind, base_layer)
    free = [s for s in range(1, len(stack.ranks)) if s not in stack.keys]
    new = [n for n in todo if n not in stack.slot_of]
    if len(new) > len(free):
        stack = _grown(stack, len(stack.ranks) + max(len(new) - len(free), len(stack.ranks) // 4))
        free = [s for s in range(1, len(stack.ranks)) if s not in stack.keys]
    for n in new:
        stack.slot_of[n] = free.pop(0)
    for n in todo:
        _write(stack, stack.slot_of[n], adapters[n], factors[n], scales[n], base_layer)
    return stack


def _rebuilt(adapters: nn.ModuleDict, kind, base_layer: nn.Module) -> Stack:
    """A stack of every mixable adapter on the layer (slot i+1 is the i-th)."""
    factors = {n: m.factors() for n, m in adapters.items() if m.mixable}
    scales = {n: adapters[n].output_scale(base_layer) for n in factors}
    rank = max([a.shape[0] for a, _ in factors.values()] or [1])
    dtype = next((a.dtype for a, _ in factors.values()), torch.float32)
    scaled = any(s is not None for s in scales.values())
    stack = empty_stack(len(factors) + 1, rank, kind, base_layer, dtype, scaled)
    for slot, (n, pair) in enumerate(factors.items(), start=1):
        stack.slot_of[n] = slot
        _write(stack, slot, adapters[n], pair, scales[n], base_layer)
    return stack


def _grown(stack: Stack, slots: int) -> Stack:
    """The same stack with empty slots added at the end (one copy, no per-adapter work)."""
    extra = slots - stack.At.shape[0]
    scale = stack.scale
    return Stack(
        At=torch.cat([stack.At, stack.At.new_zeros(extra, *stack.At.shape[1:])]),
        Bt=torch.cat([stack.Bt, stack.Bt.new_zeros(extra, *stack.Bt.shape[1:])]),
        scale=None if scale is None else torch.cat([scale, scale.new_ones(extra, scale.shape[1])]),
        slot_of=stack.slot_of, keys=stack.keys, ranks=stack.ranks + [0] * extra,
    )


@torch.no_grad()
def _write(stack: Stack, slot: int, method: AdapterMethod, pair: tuple[torch.Tensor, torch.Tensor],
           scale: torch.Tensor | None, base_layer: nn.Module) -> None:
    a, b = pair
    r = a.shape[0]
    stack.At[slot, :, :r] = a.t()
    stack.At[slot, :, r:] = 0
    stack.Bt[slot, :r] = b.t()
    stack.Bt[slot, r:] = 0
    if stack.scale is not None:
        stack.scale[slot] = 1 if scale is None else scale
    stack.ranks[slot] = r
    stack.keys[slot] = adapter_key(method, base_layer)


# One layer's part of a mixed batch (:func:`plan_batch`), a plain tuple (one is made per layer per
# batch, so its cost counts at every decoding step):
#   rows      (batch,) on the layer's device: the stack slot of each row (0: no stacked update)
#   rank      the largest rank among those slots (0: no row's stacked adapter is on this layer)
#   own_rows  ((method, its rows' indices on the device), ...) for the rows of non-mixable adapters
BatchPlan = tuple[torch.Tensor, int, tuple]


def plan_batch(layers: Sequence, names: tuple[str, ...], rows: torch.Tensor,
               stamps: dict[str, tuple]) -> list[BatchPlan]:
    """For each layer: its stack made current for ``names``, then its :class:`BatchPlan`.

    ``rows`` (CPU) holds 0 for a base row and i+1 for ``names[i]``; ``stamps`` are the batch's
    :class:`AdapterVersions`. A layer already current for every (name, stamp) of the batch does
    one set comparison; only the others look at their adapters. The slot maps of all layers on
    one device are gathered on the CPU and copied over at once, as are the row indices of the
    adapters that run on their own rows.
    """
    batch = frozenset(stamps.items())
    generation = next(iter(stamps.values()))[0] if stamps else -1
    tables, ranks = [], []
    owns: dict[int, tuple] = {}  # layer index → its non-mixable (name, batch slot) pairs, where there are any
    for layer in layers:
        mix: LayerMix = layer.mix_state
        if mix.generation != generation:
            mix.generation, mix.current, mix.confirmed = generation, {}, frozenset()
            mix.unmixable = frozenset(n for n, m in layer.adapters.items() if not m.mixable)
        if not batch <= mix.confirmed:
            unconfirmed = [n for n, _ in batch - mix.confirmed]
            mix.stack = updated_stack(mix.stack, unconfirmed, layer.adapters, layer.kind, layer.base_layer)
            mix.current.update(stamps)  # one stamp per name: training between batches grows nothing
            mix.confirmed = frozenset(mix.current.items())
            mix.last = None  # slots may have moved
        if mix.last is None or mix.last[0] != names:
            stack = mix.stack
            slots = [0, *(stack.slot_of.get(n, 0) for n in names)] if stack is not None else [0] * (len(names) + 1)
            own = tuple((n, i) for i, n in enumerate(names, start=1) if n in mix.unmixable) if mix.unmixable else ()
            mix.last = (names, slots, max(stack.ranks[s] for s in slots) if stack is not None else 0, own)
        last = mix.last
        tables.append(last[1])
        ranks.append(last[2])
        if last[3]:
            owns[len(ranks) - 1] = last[3]
    plans: list = [None] * len(layers)
    if not layers:
        return plans
    per_row = torch.tensor(tables, dtype=torch.long)[:, rows]  # (layers, batch)
    picked = {slot: (rows == slot).nonzero().flatten() for own in owns.values() for _, slot in own}
    by_device: dict[torch.device, list[int]] = {}
    for i, layer in enumerate(layers):
        by_device.setdefault(layer.weight.device, []).append(i)
    for device, indices in by_device.items():
        on_device = per_row[indices].to(device)
        if not owns:  # the usual case: every adapter of the batch is stacked
            for j, i in enumerate(indices):
                plans[i] = (on_device[j], ranks[i], ())
            continue
        picked_here = {slot: index.to(device) for slot, index in picked.items()}
        for j, i in enumerate(indices):
            own_rows = tuple((layers[i].adapters[n], picked_here[slot]) for n, slot in owns.get(i, ())
                             if picked_here[slot].numel())
            plans[i] = (on_device[j], ranks[i], own_rows)
    return plans


def mixed_forward(
    kind, base_layer: nn.Module, out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, rank: int, stack: Stack,
    *, inplace: bool = False,
) -> torch.Tensor:
    """The layer output when row b uses stack slot rows[b] (its factors up to ``rank``).

    ``inplace=True`` says the caller owns ``out``: the update is accumulated into it.
    """
    if not isinstance(kind, MIXABLE_KINDS):
        raise NotImplementedError(f"mixed-adapter batches are not supported on {kind.name} layers")
    embedding_check(kind, base_layer)
    if x.shape[0] != rows.shape[0]:
        raise ValueError(f"mixed batch: {x.shape[0]} rows in the input but {rows.shape[0]} adapter names")
    batch = x.shape[0]
    if x[0].numel() == x.shape[-1] and not isinstance(kind, EmbeddingKind) and out.is_contiguous():
        total = _one_token_update(out, x, rows, stack, inplace)  # a decoding step
    else:
        total = _gathered_update(kind, out, x, rows, rank, stack, inplace)
    if stack.scale is None:
        return total
    scale = stack.scale[rows].to(out.dtype).reshape(batch, *([1] * (out.dim() - 2)), -1)
    bias = kind.bias(base_layer)
    if bias is None:
        return scale * total
    return scale * (total - bias) + bias


def _gathered_update(kind, out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, rank: int, stack: Stack,
                     inplace: bool) -> torch.Tensor:
    """out + each row's update from its own gathered factors (up to ``rank``) in batched products."""
    batch = x.shape[0]
    Bt_rows = stack.Bt[:, :rank].index_select(0, rows).to(out.dtype)  # (batch, R, out)
    if isinstance(kind, EmbeddingKind):
        # Row b, token t reads column x[b, t] of its adapter's A.
        h = stack.At[rows[:, None], x.reshape(batch, -1), :rank]  # (batch, L, R)
    else:
        At_rows = stack.At[:, :, :rank].index_select(0, rows)  # (batch, in, R)
        h = torch.bmm(x.reshape(batch, -1, x.shape[-1]), At_rows.to(x.dtype))
    h = h.to(out.dtype)
    # One GEMM accumulating into the output, as the single-adapter path does (kinds.add_up_);
    # under autograd not into a view, whose backward would clone the whole output gradient.
    if inplace and out.dim() == 3 and not (torch.is_grad_enabled() and out._is_view()):
        return out.baddbmm_(h, Bt_rows)
    return out + torch.bmm(h, Bt_rows).reshape(out.shape)


def _one_token_update(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, stack: Stack,
                      inplace: bool) -> torch.Tensor:
    """A decoding step (one token per row) without gathering factors.

    Both products are weighted sums of rows of the stack, read in place (``embedding_bag``):
    h = Σᵢ xᵢ · Aᵀ[slot, i] over the input features, then Σᵣ hᵣ · Bᵀ[slot, r] over the rank. At
    one token per row a gather's copy of every row's factors was most of the step's work; this
    reads each of them once and writes nothing but h and the update. Padded ranks hold zeros
    (exact).
    """
    batch, (slots, n_in, R), n_out = x.shape[0], stack.At.shape, stack.Bt.shape[-1]
    At, Bt = stack.At.view(slots * n_in, R), stack.Bt.view(slots * R, n_out)
    inputs = rows[:, None] * n_in + torch.arange(n_in, device=rows.device)  # (batch, in): rows of Aᵀ
    h = F.embedding_bag(inputs, At, mode="sum", per_sample_weights=x.reshape(batch, n_in).to(At.dtype))
    ranks = rows[:, None] * R + torch.arange(R, device=rows.device)  # (batch, R): rows of Bᵀ
    update = F.embedding_bag(ranks, Bt, mode="sum", per_sample_weights=h.to(Bt.dtype)).to(out.dtype)
    if inplace and not (torch.is_grad_enabled() and out._is_view()):
        return out.add_(update.view(out.shape))
    return out + update.view(out.shape)


def own_rows_forward(out: torch.Tensor, x: torch.Tensor, base_layer: nn.Module, own_rows: tuple,
                     inplace: bool) -> torch.Tensor:
    """Rows of non-mixable adapters through each method's own forward, on those rows only.

    Those rows read the stack's zero slot, so ``out`` holds their bare base output, which is
    what the method's forward expects. ``inplace=True`` says the caller owns ``out``.
    """
    for method, index in own_rows:
        updated = method(x.index_select(0, index), out.index_select(0, index), base_layer, inplace=True)
        if inplace and not torch.is_grad_enabled():
            out.index_copy_(0, index, updated.to(out.dtype))
        else:
            out = out.index_copy(0, index, updated.to(out.dtype))
            inplace = True
    return out


def embedding_check(kind, base_layer: nn.Module) -> None:
    """Stacked factors are read by token id, which an embedding's ``max_norm`` (a renormalisation
    of the looked-up rows) would change; such layers are refused rather than served differently."""
    if isinstance(kind, EmbeddingKind) and base_layer.max_norm is not None:
        raise NotImplementedError(
            "mixed-adapter batches on an embedding with max_norm are not supported (its lookups renormalise "
            "the adapter's rows); run each adapter on its own (set_active) for this model")


__all__ = ["BASE", "AdapterVersions", "BatchPlan", "LayerMix", "Stack", "adapter_key", "embedding_check",
           "mixed_forward", "own_rows_forward", "plan_batch", "updated_stack"]
