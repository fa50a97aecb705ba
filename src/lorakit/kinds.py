"""Base layer kinds: how a low-rank update meets each kind of frozen layer.

Every method thinks in the linear convention: a weight matrix W of shape (out, in), a down
projection A (r, in) and an up projection B (out, r). A *kind* translates that convention to
one base layer type:

    kind          W (out, in) is                      A x                      B h
    Linear        weight                              x @ A.T                  h @ B.T
    Conv1D (GPT2) weight.T (stored in, out)           x @ A.T                  h @ B.T
    Embedding     weight.T (stored vocab, dim)        A.T[ids] (a lookup)      h @ B.T
    Conv2d        weight.view(out, in*kh*kw)          conv(x, A as r filters)  1x1 conv with B

So adding a base layer kind never touches a method, and adding a method never touches a kind.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
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


class LinearKind(LayerKind):
    name = "Linear"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def as_matrix(self, stored: torch.Tensor) -> torch.Tensor:
        return stored


class Conv1DKind(LayerKind):
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""

    name = "Conv1D"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        cls = type(module)
        return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")

    def as_matrix(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.t()


class EmbeddingKind(LayerKind):
    """nn.Embedding as a linear map from one-hot token vectors: W = weight.T, (dim, vocab)."""

    name = "Embedding"
    peft_a_key = "lora_embedding_A"
    peft_b_key = "lora_embedding_B"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self._module = module

    def as_matrix(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.t()

    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        m = self._module
        return F.embedding(x, A.t(), m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return None

    def supports_dropout(self) -> bool:
        return False  # token ids cannot be dropped out; PEFT applies none either


class Conv2dKind(LayerKind):
    """nn.Conv2d: A is r filters of the base kernel size, B a 1x1 convolution (PEFT's layout)."""

    name = "Conv2d"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def __init__(self, module: nn.Module) -> None:
        if module.groups != 1:
            raise NotImplementedError(f"LoRA on grouped convolutions (groups={module.groups}) is not supported")
        super().__init__(module)
        self._module = module
        self.kernel_shape = tuple(module.weight.shape[1:])  # (in, kh, kw)

    def as_matrix(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.reshape(stored.shape[0], -1)

    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        m = self._module
        weight = A.reshape(A.shape[0], *self.kernel_shape).to(x.dtype)
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            return F.conv2d(x, weight, None, m.stride, 0, m.dilation)
        return F.conv2d(x, weight, None, m.stride, m.padding, m.dilation)

    def up(self, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nrhw,or->nohw", h, B.to(h.dtype))

    def add_up_(self, out: torch.Tensor, h: torch.Tensor, B: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        if not out.is_contiguous():
            return out.add_(self.up(h, B).to(out.dtype), alpha=alpha)
        n, o = out.shape[:2]  # (n, out, H·W) + B (out, r) @ h (n, r, H·W)
        B = B.to(out.dtype).expand(n, *B.shape)
        h = h.to(out.dtype).reshape(n, B.shape[-1], -1)
        if torch.is_grad_enabled():  # not in place on a view under autograd (see LayerKind.add_up_)
            return torch.baddbmm(out.view(n, o, -1), B, h, alpha=alpha).view(out.shape)
        out.view(n, o, -1).baddbmm_(B, h, alpha=alpha)
        return out

    def channel(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.reshape(-1, 1, 1)

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return None if module.bias is None else module.bias.reshape(-1, 1, 1)

    def a_to_file(self, A: torch.Tensor) -> torch.Tensor:
        return A.reshape(A.shape[0], *self.kernel_shape)

    def b_to_file(self, B: torch.Tensor) -> torch.Tensor:
        return B.reshape(*B.shape, 1, 1)

    def magnitude_to_file(self, m: torch.Tensor) -> torch.Tensor:
        return m.reshape(1, -1, 1, 1)


KINDS: tuple[type[LayerKind], ...] = (LinearKind, Conv1DKind, EmbeddingKind, Conv2dKind)
LINEAR_KINDS: tuple[type[LayerKind], ...] = (LinearKind, Conv1DKind)


def register_kind(kind_cls: type[LayerKind], linear: bool) -> None:
    """Add a base layer kind (``linear``: "all-linear" picks it). It is tried before the built-in
    kinds, so a subclass of nn.Linear (bitsandbytes' layers are) gets its own kind."""
    global KINDS, LINEAR_KINDS
    if kind_cls in KINDS:
        return
    KINDS = (kind_cls, *KINDS)
    if linear:
        LINEAR_KINDS = (kind_cls, *LINEAR_KINDS)


def kind_for(module: nn.Module) -> LayerKind | None:
    """The kind of an adaptable module, or None when lorakit cannot adapt it."""
    for kind in KINDS:
        if kind.matches(module):
            return kind(module)
    return None


def is_adaptable(module: nn.Module) -> bool:
    return any(kind.matches(module) for kind in KINDS)


def is_linear(module: nn.Module) -> bool:
    return any(kind.matches(module) for kind in LINEAR_KINDS)


# bitsandbytes' quantised linears (QLoRA). The module registers its kinds without importing
# bitsandbytes, which stays optional: a model can only hold its layers once it is imported.
from lorakit import kinds_quantized  # noqa: E402, F401
