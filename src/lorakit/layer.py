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
from lorakit.fused import accepts_base, fused_linear
from lorakit.kinds_base import LayerKind
from lorakit.methods import require_mergeable
from lorakit.methods.base import AdapterMethod
from lorakit.mixed import BatchPlan, LayerMix, mixed_forward, own_rows_forward
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
        # This batch's rows → adapters on this layer, set by AdaptedModel.mixed_batch for the
        # duration of a mixed-adapter batch (lorakit.mixed.plan_batch); None otherwise.
        self.batch_plan: BatchPlan | None = None
        # What mixed batches keep between batches: the stacked factors of the adapters here.
        self.mix_state = LayerMix()

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
        if self.batch_plan is not None:
            return self._mixed_forward(x, out, inplace)
        for name in self.active:
            if name not in self.merged:
                out = self.adapters[name](x, out, self.base_layer, inplace=inplace)
        return out

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Training with one adapter on a frozen plain Linear: base and update as one autograd
        node (:mod:`lorakit.fused`); None where the generic path below must run."""
        if self.disabled or self.batch_plan is not None:
            return None
        names = [n for n in self.active if n not in self.merged]
        if len(names) != 1 or not accepts_base(self.base_layer, x):
            return None
        update = self.adapters[names[0]].fused_update(self.base_layer)
        return None if update is None else fused_linear(self.base_layer, x, update)

    def _mixed_forward(self, x: torch.Tensor, out: torch.Tensor, inplace: bool) -> torch.Tensor:
        rows, rank, own_rows = self.batch_plan
        if rank:
            stacked = mixed_forward(self.kind, self.base_layer, out, x, rows, rank, self.mix_state.stack,
                                    inplace=inplace)
            inplace = inplace or stacked is not out  # a new tensor is ours to write into
            out = stacked
        if own_rows:
            out = own_rows_forward(out, x, self.base_layer, own_rows, inplace)
        return out

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
        shift = self.adapters[name].weight_shift()
        if shift is not None:
            self._add_to_weight(-shift)
        del self.adapters[name]
        structure_changed()
        self.mix_state.forget(name)
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
        refuse_unmergeable({n: self.adapters[n] for n in todo})
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
        todo = [n for n in names if n in self.adapters]
        refuse_unmergeable({n: self.adapters[n] for n in todo})
        W0 = self.kind.weight_matrix(self.base_layer).float()
        W = W0
        for name in todo:
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
        self.mix_state.rename(old, new)

    def extra_repr(self) -> str:
        return f"kind={self.kind.name}, active={list(self.active)}, merged={self.merged}"


def refuse_unmergeable(adapters: dict[str, AdapterMethod]) -> None:
    """A ConfigError naming the first adapter whose method cannot be merged, before anything is written."""
    for name, method in adapters.items():
        require_mergeable(name, method.method_name)
