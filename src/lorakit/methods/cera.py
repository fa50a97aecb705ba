"""CeRA (arXiv:2602.22911; its first version called it NoRA): a weight-level parallel adapter
whose non-linearity stays at inference.

Only the abstract could be read: a parallel adapter on each weight with SiLU gating and dropout,
whose non-linearity is kept at inference, so it cannot be merged into W. The paper's exact
equation could not be read. **lorakit's reading** is a SwiGLU-style gated low-rank branch:

    h = W x + s · B (silu(A_g x̃) ⊙ (A x̃)),   x̃ = dropout(x)

    A_g (r, in)  the gate projection       A (r, in)  the value projection
    B (out, r)   the up projection, 0 at init, so the model starts unchanged
    s = alpha / r  (alpha / √r with rsLoRA), one dropout mask shared by both projections

Why a gate and not the simpler ``B silu(A x)``: the abstract names SiLU *gating*, and a gate is
one branch multiplying another (the GLU family, SwiGLU in today's MLPs); ``silu(A x)`` alone is
an activation. The cost is one more (r, in) matrix: r·(2·in + out) trainable values per layer,
1.5× LoRA's at the same rank on a square layer, so a rank of about ⅔ of LoRA's matches LoRA's
budget. Both projections start Kaiming-uniform as LoRA's A does ("gaussian": N(0, 1/r²) as
PEFT's gaussian LoRA init); only B starts at zero, so every step after the first reaches all three.

What follows from the non-linearity, declared below: the update is not a change of W (it is
non-linear in x), so merging, ``lorakit merge`` and combining are refused before anything
changes; it has no factors to stack, so in mixed batches its rows run through its own forward
(exact, beside stacked LoRA rows); PEFT has no such method, so its files carry lorakit's own
``peft_type`` (LORAKIT_CERA, PEFT's folder layout, tensors ``cera_A``, ``cera_gate_A``, ``cera_B``),
which lorakit loads back exactly and PEFT's loader refuses. It works on every layer kind, since it
only needs each kind's A x and B h (a convolution's rank features are channels: the gate is
elementwise there too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kinds_base import LayerKind
from lorakit.methods.base import AdapterMethod, filled_by_caller


class CeRA(AdapterMethod):
    method_name = "cera"
    title = "CeRA"
    peft_type = None  # saved as LORAKIT_CERA
    mergeable = False
    why_not_mergeable = "its update is non-linear in x (a SiLU gate kept at inference), so no weight change equals it"
    mixable = False  # no factors: its rows run through its own forward in mixed batches
    combinable = False
    trainable = ("cera_gate_A", "cera_A", "cera_B")
    up_tensors = ("cera_B",)
    inits = ("default", "gaussian")

    def __init__(self, kind: LayerKind, rank: int, scaling: float, dropout: float) -> None:
        super().__init__(kind, rank, scaling, dropout)
        filled = filled_by_caller()  # loading a file: every tensor is overwritten, skip the random init
        self.cera_gate_A = nn.Parameter(torch.empty(rank, kind.in_features))
        self.cera_A = nn.Parameter(torch.empty(rank, kind.in_features))
        self.cera_B = nn.Parameter((torch.empty if filled else torch.zeros)(kind.out_features, rank))
        if not filled:
            nn.init.kaiming_uniform_(self.cera_gate_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.cera_A, a=math.sqrt(5))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """silu(A_g x̃) ⊙ (A x̃): the rank features, in the layer's rank layout (last dim, channels for conv)."""
        x = self.dropout(x)
        return F.silu(self.kind.down(x, self.cera_gate_A)) * self.kind.down(x, self.cera_A)

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, *, inplace: bool = False
    ) -> torch.Tensor:
        out = base_out if inplace else base_out.clone()
        return self.kind.add_up_(out, self.hidden(x), self.cera_B, self.scaling)

    @torch.no_grad()
    def initialise(self, init: str, base_layer: nn.Module, gradient: torch.Tensor | None) -> None:
        if init == "gaussian":  # both projections ~ N(0, 1/r²), as PEFT's gaussian LoRA init; B = 0
            nn.init.normal_(self.cera_gate_A, std=1.0 / self.rank)
            nn.init.normal_(self.cera_A, std=1.0 / self.rank)
            self.cera_B.zero_()
        else:
            super().initialise(init, base_layer, gradient)
