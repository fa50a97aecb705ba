"""LoRA (Hu et al. 2021, arXiv:2106.09685) and LoRA-FA (Zhang et al. 2023, arXiv:2308.03303).

    h = W x + s · B A x,   A (r, in), B (out, r), s = alpha / r  (alpha / sqrt(r) with rsLoRA)

Two optional frozen low-rank terms describe weights that moved away from the original base,
so that nothing lorakit does leaves the base changed for other adapters loaded after it:

- ``offset``: part of the forward. PiSSA / gradient-SVD inits subtract their initial update
  here (h = W x + s·B A x − s·B0 A0 x) instead of editing W, so the model is unchanged at
  step 0 and W stays the original.
- ``shift``: already inside the base weight in memory (Delta-LoRA moves W during training).
  It is not applied in the forward; it is added when exporting and removed on deletion.

Exported, the total change from the original base is one plain LoRA of rank r + k.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.kinds import LayerKind
from lorakit.methods.base import AdapterMethod

_FILLED_BY_CALLER = contextvars.ContextVar("lorakit_factors_filled_by_caller", default=False)


@contextlib.contextmanager
def factors_filled_by_caller() -> Iterator[None]:
    """Inside the block new LoRA factors skip their random init: the caller overwrites every one
    (loading a file). Kaiming init of a 7B model's r=16 A matrices costs more than reading the file."""
    token = _FILLED_BY_CALLER.set(True)
    try:
        yield
    finally:
        _FILLED_BY_CALLER.reset(token)


class LoRA(AdapterMethod):
    method_name = "lora"
    peft_type = "LORA"
    trainable = ("lora_A", "lora_B")

    def __init__(self, kind: LayerKind, rank: int, scaling: float, dropout: float) -> None:
        super().__init__(kind, rank, scaling, dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, kind.in_features))
        filled_by_caller = _FILLED_BY_CALLER.get()
        self.lora_B = nn.Parameter((torch.empty if filled_by_caller else torch.zeros)(kind.out_features, rank))
        if not filled_by_caller:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # Frozen terms; empty (rank 0) unless an init or a training rule sets them.
        self.register_buffer("offset_A", torch.zeros(0, kind.in_features))
        self.register_buffer("offset_B", torch.zeros(kind.out_features, 0))
        self.register_buffer("shift_A", torch.zeros(0, kind.in_features))
        self.register_buffer("shift_B", torch.zeros(kind.out_features, 0))

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, *, inplace: bool = False
    ) -> torch.Tensor:
        return self.add_update_(x, base_out if inplace else base_out.clone())

    def add_update_(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out += s · B A x (plus the frozen offset) in place: one GEMM accumulating into ``out``.

        The scaling rides on the GEMM's alpha rather than on a scaled copy of B.
        """
        kind = self.kind
        x = self.dropout(x)
        if self.offset_A.shape[0] == 0:
            return kind.add_up_(out, kind.down(x, self.lora_A), self.lora_B, self.scaling)
        A, B = self.factors()
        return kind.add_up_(out, kind.down(x, A), B)

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if type(self).forward is not LoRA.forward or self.dropout_in_effect():
            return None  # DoRA (its own forward) and dropout take the generic path
        if self.offset_A.shape[0] == 0:
            return self.lora_A, self.lora_B, self.scaling
        A, B = self.factors()
        return A, B, 1.0

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A x (plus the frozen offset), never forming an (out, in) matrix."""
        kind = self.kind
        A, B = self.factors()
        return kind.up(kind.down(self.dropout(x), A), B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.lora_B * self.scaling
        if self.offset_A.shape[0] == 0:
            return self.lora_A, B
        return torch.cat([self.lora_A, self.offset_A]), torch.cat([B, self.offset_B], dim=1)

    def exported_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of the whole change from the original base weight (offset and shift included)."""
        A, B = self.factors()
        if self.shift_A.shape[0] == 0:
            return A.detach(), B.detach()
        r = self.lora_A.shape[0]
        if self.offset_A.shape[0] == 0 and torch.equal(self.shift_A[:r], self.lora_A):
            # Delta-LoRA's shift c·s·(B_T A_T − B_K A_K) was recorded with the current A, so
            # s·B A + shift = [s·B + c·s·B_T | −c·s·B_K] [A; A_K]: rank 2r, not 3r.
            B_out = torch.cat([B + self.shift_B[:, :r], self.shift_B[:, r:]], dim=1)
            return self.shift_A.detach().clone(), B_out.detach()
        return torch.cat([A, self.shift_A]).detach(), torch.cat([B, self.shift_B], dim=1).detach()

    def set_offset(self, A0: torch.Tensor, B0_scaled: torch.Tensor) -> None:
        """Make the forward subtract B0_scaled @ A0 (the initial update), keeping W untouched."""
        self.offset_A = A0.detach().to(self.lora_A).clone()
        self.offset_B = (-B0_scaled).detach().to(self.lora_A).clone()


class LoRAFA(LoRA):
    """LoRA-FA: A is frozen after initialisation, only B trains (halves activation memory for A)."""

    method_name = "lora-fa"
    trainable = ("lora_B",)

    def __init__(self, kind: LayerKind, rank: int, scaling: float, dropout: float) -> None:
        super().__init__(kind, rank, scaling, dropout)
        self.lora_A.requires_grad_(False)
