"""The protocol every adapter method follows.

A method owns its tensors for one base layer and answers four questions: how it changes the
layer output (``forward``), which low-rank factors express its update (``factors``), what
merged weight it produces (``merged_weight``) and how a merged weight is undone
(``unmerged_weight``). It never touches the base layer's parameters itself; the wrapping layer
does that, so merge bookkeeping lives in one place.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lorakit.kinds import LayerKind
from lorakit.structure import structure_changed


class AdapterMethod(nn.Module):
    """One named adapter on one base layer."""

    method_name: ClassVar[str]
    peft_type: ClassVar[str]  # "LORA" or "VERA"
    additive: ClassVar[bool] = True  # merged W = W + delta; False for DoRA
    trainable: ClassVar[tuple[str, ...]]  # names of the tensors that train

    def __init__(self, kind: LayerKind, rank: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        self.rank = rank
        self.scaling = scaling
        self.dropout: nn.Module = (
            nn.Dropout(dropout) if dropout > 0 and kind.supports_dropout() else nn.Identity()
        )

    # Mixed batches keep per-adapter lists of tensors (lorakit.mixed.AdapterTokens); a tensor
    # assigned, registered or converted to a new object must invalidate them.
    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if isinstance(value, torch.Tensor):
            structure_changed()

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        structure_changed()

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        structure_changed()
        return result

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, *, inplace: bool = False
    ) -> torch.Tensor:
        """The layer output with this adapter applied, given the base layer's output.

        ``inplace=True`` says the caller owns ``base_out``: the update is written into it.
        """
        A, B = self.factors()
        out = base_out if inplace else base_out.clone()
        return self.kind.add_up_(out, self.kind.down(self.dropout(x), A), B)

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, s) when this adapter's output is exactly the layer input's ``s·B A x`` added to the
        base output (an additive method, its own forward, no dropout in effect), so the layer may
        run base and update as one autograd node (:mod:`lorakit.fused`); None otherwise. A method
        that overrides ``forward`` returns None unless it says otherwise."""
        if type(self).forward is not AdapterMethod.forward or not self.additive or self.dropout_in_effect():
            return None
        A, B = self.factors()
        return A, B, 1.0

    def dropout_in_effect(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout) and self.dropout.p > 0

    # -- the update as factors ---------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with the scaling folded in, so that the additive update is exactly B @ A."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The additive update B @ A as an (out, in) float32 matrix (merging only)."""
        A, B = self.factors()
        return B.float() @ A.float()

    # -- merging -----------------------------------------------------------------------------
    def merged_weight(self, W: torch.Tensor, forward_base: torch.Tensor | None = None) -> torch.Tensor:
        """W' from a float32 (out, in) W. Additive methods add delta_weight().

        ``forward_base`` is the weight the unmerged forward sees as the base layer's (W without
        adapters merged in the same call); only methods whose update depends on W (DoRA) use it,
        so that merging several adapters at once gives what running them unmerged gave.
        """
        return W + self.delta_weight()

    def unmerged_weight(self, W_merged: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`merged_weight` on float32 (out, in) values."""
        return W_merged - self.delta_weight()

    # -- bookkeeping -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self.trainable]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, in={self.kind.in_features}, out={self.kind.out_features}"
