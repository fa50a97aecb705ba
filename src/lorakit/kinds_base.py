"""The base of every layer kind: the operations a method needs from a base layer, in the linear convention.

A kind translates the linear convention (W (out, in), A (r, in), B (out, r)) to one base layer
type; :mod:`lorakit.kinds` holds the built-in kinds and the registry, :mod:`lorakit.kinds_quantized`
the bitsandbytes ones. This class lives in a module of its own so both can build on it without
importing each other.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class LayerKind:
    """The operations a method needs from a base layer, in the linear convention."""

    name: ClassVar[str]
    # Suffixes of PEFT's tensor names for this kind, e.g. "lora_A.weight".
    peft_a_key: ClassVar[str] = "lora_A.weight"
    peft_b_key: ClassVar[str] = "lora_B.weight"
    # False when weight_matrix returns a copy (a dequantised 4-bit/8-bit weight): nothing can be
    # written into W in place, so merging and methods that move W refuse.
    writable: ClassVar[bool] = True
    # False when the base layer's output may be a view made inside a custom autograd Function
    # (bitsandbytes' matmuls), which autograd forbids writing into: adapters then add out of place.
    inplace_output: ClassVar[bool] = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError

    def __init__(self, module: nn.Module) -> None:
        self.out_features, self.in_features = self.weight_matrix(module).shape

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        """W as an (out, in) view of the stored weight (no copy)."""
        return self.as_matrix(module.weight)

    def as_matrix(self, stored: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the stored weight (the weight, its gradient) as an (out, in) view."""
        raise NotImplementedError

    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """A x: project the layer input onto the rank dimension (last dim, or channels for conv)."""
        return x @ A.t().to(x.dtype)

    def up(self, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """B h: project rank features to the layer's output shape."""
        return h @ B.t().to(h.dtype)

    def add_up_(self, out: torch.Tensor, h: torch.Tensor, B: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """out + alpha · B h, written into ``out`` (which the caller owns) where that is cheaper.

        One GEMM accumulating into the output (beta = 1): no temporary of the output's size, one
        pass over it instead of three, and ``alpha`` scales for free. Under autograd a view (a
        biased ``F.linear`` returns one) is not written in place, because autograd would then
        clone the whole output gradient in backward; the GEMM then writes a new tensor.
        """
        h, Bt = h.to(out.dtype), B.to(out.dtype).t()
        n, r = out.shape[-1], h.shape[-1]
        if torch.is_grad_enabled() and (out._is_view() or out.dim() > 3):
            return torch.addmm(out.reshape(-1, n), h.reshape(-1, r), Bt, alpha=alpha).view(out.shape)
        if out.dim() == 2:
            return out.addmm_(h, Bt, alpha=alpha)
        if out.dim() == 3:
            return out.baddbmm_(h, Bt.expand(out.shape[0], r, n), alpha=alpha)
        if out.is_contiguous():
            out.view(-1, n).addmm_(h.reshape(-1, r), Bt, alpha=alpha)
            return out
        return out.add_(h @ Bt, alpha=alpha)

    def channel(self, vector: torch.Tensor) -> torch.Tensor:
        """Reshape a per-output-feature vector to broadcast against the layer output."""
        return vector

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return getattr(module, "bias", None)

    def a_to_file(self, A: torch.Tensor) -> torch.Tensor:
        """A in the shape PEFT stores it."""
        return A

    def b_to_file(self, B: torch.Tensor) -> torch.Tensor:
        return B

    def a_from_file(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0], -1)

    def b_from_file(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0], -1)

    def magnitude_to_file(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def supports_dropout(self) -> bool:
        return True
