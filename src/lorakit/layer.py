"""The wrapper that holds a frozen base layer and its named adapters.

The base layer keeps its own class and parameter names (``base_layer.weight``); adapters live
in a ``ModuleDict``. Merge bookkeeping lives here and only here: methods say what a merged
weight is, this layer writes it, rounding once from float32.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from lorakit.finite import all_finite
from lorakit.fused import fused_linear
from lorakit.kinds import LayerKind
from lorakit.methods.base import AdapterMethod
from lorakit.mixed import LayerMix, mixed_forward
from lorakit.structure import structure_changed

_EXACT_DTYPES = (torch.float32, torch.float64)


class AdaptedLayer(nn.Module):
    """A base layer plus named adapters; ``forward`` adds the active, unmerged ones."""

    def __init__(self, base_layer: nn.Module, kind: LayerKind) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []  # merge order; unmerge undoes it in reverse
        self.disabled = False
        self.fingerprint: dict | None = None  # of the original base weight, for adapter files
        # Half-precision weights cannot be un-merged exactly by arithmetic; keep the original.
        self._weight_before_merge: torch.Tensor | None = None
        # Set by AdaptedModel.mixed_batch (mixed.plan_batch): (the stack slot of each row, the
        # largest rank among them; 0 when no row's adapter is on this layer).
        self.mixed: tuple[torch.Tensor, int] | None = None
        self.mix = LayerMix()  # mixed-batch state (stacked factors of every adapter); see lorakit.mixed

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled() and not (args or kwargs):
            fused = self._fused_forward(x)
            if fused is not None:
                return fused
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        # Adapters may write into the fresh base output (no temporary of its size) unless a
        # forward hook on the base layer has seen it and may be keeping it.
        inplace = self.kind.inplace_output and not (self.base_layer._forward_hooks or _global_forward_hooks)
        if self.mixed is not None:
            return self._mixed_forward(x, out, inplace)
        for name in self.active:
            if name not in self.merged:
                out = self.adapters[name](x, out, self.base_layer, inplace=inplace)
        return out

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Training with one adapter on a frozen plain Linear: base and update as one autograd
        node (:mod:`lorakit.fused`); None where the generic path below must run."""
        if self.disabled or self.mixed is not None:
            return None
        names = [n for n in self.active if n not in self.merged]
        if len(names) != 1:
            return None
        factors = self.adapters[names[0]].fused_factors()
        return None if factors is None else fused_linear(self.base_layer, x, *factors)

    def _mixed_forward(self, x: torch.Tensor, out: torch.Tensor, inplace: bool) -> torch.Tensor:
        rows, rank = self.mixed
        if rank == 0:
            return out  # no row's adapter is on this layer
        return mixed_forward(self.kind, self.base_layer, out, x, rows, rank, self.mix.stack, inplace=inplace)

    # -- adapters ----------------------------------------------------------------------------
    def add(self, name: str, adapter: AdapterMethod) -> None:
        device = self.adapter_device
        if any(t.device != device for t in (*adapter.parameters(), *adapter.buffers())):
            adapter = adapter.to(device=device)  # Module.to walks every tensor in Python: skipped when done
        self.adapters[name] = adapter.train(self.training)
        structure_changed()

    @property
    def adapter_device(self) -> torch.device:
        """The base's device; a base on the meta device (shapes only) still gets real CPU tensors."""
        device = self.weight.device
        return device if device.type != "meta" else torch.device("cpu")

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        adapter = self.adapters[name]
        shift = getattr(adapter, "shift_A", None)
        if shift is not None and shift.shape[0] > 0:
            self._add_to_weight(-(adapter.shift_B.float() @ adapter.shift_A.float()))
        del self.adapters[name]
        structure_changed()
        self.mix.forget(name)
        self.active = tuple(a for a in self.active if a != name)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, …: the base weight and adapter tensors may become new objects."""
        result = super()._apply(fn, recurse)
        structure_changed()
        return result

    # -- merging -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: Iterable[str]) -> None:
        """Write the named adapters into the base weight, accumulating in float32."""
        todo = [n for n in names if n in self.adapters and n not in self.merged]
        if not todo:
            return
        if not self.kind.writable:
            raise NotImplementedError(
                f"cannot merge into a {self.kind.name} base: merging into a 4-bit/8-bit base would round the "
                "update into the quantisation grid; use merge_and_unload(), which returns a dequantised model"
            )
        W_view = self.kind.weight_matrix(self.base_layer)
        if W_view.dtype not in _EXACT_DTYPES and self._weight_before_merge is None:
            self._weight_before_merge = self.base_layer.weight.detach().clone()
        W = W_view.float()
        W_start = W
        for name in todo:
            adapter = self.adapters[name]
            new = adapter.merged_weight(W, forward_base=W_start)
            if not all_finite(new):
                raise ValueError(f"merging adapter {name!r} would write NaN/Inf into the base weight; not merged")
            W = new
            self.merged.append(name)
        W_view.copy_(W)

    @torch.no_grad()
    def dequantised_merge(self, names: Iterable[str]) -> tuple[nn.Module, float]:
        """For a quantised (non-writable) base: a plain layer holding the dequantised W with the
        named adapters merged in float32, and the largest |ΔW| they moved it by. The base is untouched."""
        W0 = self.kind.weight_matrix(self.base_layer).float()
        W = W0
        for name in [n for n in names if n in self.adapters]:
            W = self.adapters[name].merged_weight(W, forward_base=W0)
            if not all_finite(W):
                raise ValueError(f"merging adapter {name!r} would write NaN/Inf into the weight; not merged")
        moved = (W - W0).abs().max().item() if W is not W0 else 0.0
        return self.kind.to_plain(self.base_layer, W), moved

    @torch.no_grad()
    def unmerge(self, names: Iterable[str] | None = None) -> None:
        """Take the named (default: all) merged adapters back out of the base weight."""
        remove = set(self.merged if names is None else names) & set(self.merged)
        if not remove:
            return
        keep = [n for n in self.merged if n not in remove]
        W_view = self.kind.weight_matrix(self.base_layer)
        if self._weight_before_merge is not None:
            self.base_layer.weight.copy_(self._weight_before_merge)
            self._weight_before_merge = None
            self.merged = []
            self.merge(keep)
            return
        W = W_view.float() if W_view.dtype != torch.float64 else W_view.clone()
        # Undo in reverse order down to the first adapter to remove, then redo the kept ones.
        first = min(self.merged.index(n) for n in remove)
        undo = self.merged[first:]
        for name in reversed(undo):
            W = self.adapters[name].unmerged_weight(W)
        self.merged = self.merged[:first]
        W_view.copy_(W)
        self.merge([n for n in undo if n not in remove])

    @torch.no_grad()
    def _add_to_weight(self, delta: torch.Tensor) -> None:
        W_view = self.kind.weight_matrix(self.base_layer)
        W_view.copy_(W_view.float() + delta)

    def rename(self, old: str, new: str) -> None:
        self.adapters[new] = self.adapters.pop(old)
        structure_changed()
        self.active = tuple(new if a == old else a for a in self.active)
        self.merged = [new if a == old else a for a in self.merged]
        self.mix.rename(old, new)

    def extra_repr(self) -> str:
        return f"kind={self.kind.name}, active={list(self.active)}, merged={self.merged}"
