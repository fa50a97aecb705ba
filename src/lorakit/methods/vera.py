"""VeRA (Kopiczko et al. 2024, arXiv:2310.11454): vector-based random matrix adaptation.

    h = W x + b ⊙ (B (d ⊙ (A x)))

A (r, in_max) and B (out_max, r) are frozen random matrices generated once from a seed and
shared by every adapted layer of the model (each layer uses the top-left slice it needs). Only
the vectors d (r, starts at a small constant) and b (out, starts at 0) train. VeRA is therefore
LoRA-shaped: its update is exactly (b ⊙ B) (d ⊙ A).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.kinds import LayerKind
from lorakit.methods.base import AdapterMethod


class VeraProjections(nn.Module):
    """The shared frozen pair, one module referenced by every VeRA layer of an adapter.

    Buffers are non-persistent: the projections are saved once per adapter, not per layer.
    """

    def __init__(self, rank: int, in_max: int, out_max: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        A = torch.empty(rank, in_max)
        B = torch.empty(out_max, rank)
        _kaiming_uniform(A, generator)
        _kaiming_uniform(B, generator)
        self.register_buffer("vera_A", A, persistent=False)
        self.register_buffer("vera_B", B, persistent=False)


def _kaiming_uniform(tensor: torch.Tensor, generator: torch.Generator) -> None:
    bound = 1.0 / math.sqrt(tensor.shape[1])  # kaiming_uniform with a = sqrt(5)
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


class VeRA(AdapterMethod):
    method_name = "vera"
    peft_type = "VERA"
    trainable = ("vera_lambda_d", "vera_lambda_b")

    def __init__(
        self, kind: LayerKind, rank: int, scaling: float, dropout: float,
        projections: VeraProjections, d_initial: float,
    ) -> None:
        super().__init__(kind, rank, 1.0, dropout)
        if projections.vera_A.shape[1] < kind.in_features or projections.vera_B.shape[0] < kind.out_features:
            raise ValueError("VeRA projections are smaller than the layer they must cover")
        self.projections = projections
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), float(d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(kind.out_features))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = self.projections.vera_A[:, : self.kind.in_features]
        B = self.projections.vera_B[: self.kind.out_features, :]
        return self.vera_lambda_d.unsqueeze(1) * A, self.vera_lambda_b.unsqueeze(1) * B
