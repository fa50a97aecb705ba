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

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kinds_base import LayerKind
from lorakit.kinds_quantized import QUANTIZED_KINDS


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


BUILT_IN_KINDS: tuple[type[LayerKind], ...] = (LinearKind, Conv1DKind, EmbeddingKind, Conv2dKind)
# Tried in order: bitsandbytes' quantised linears first, as they subclass nn.Linear. They match only
# once the user (or lorakit.quantize) imported bitsandbytes, which stays optional.
KINDS: tuple[type[LayerKind], ...] = (*QUANTIZED_KINDS, *BUILT_IN_KINDS)
LINEAR_KINDS: tuple[type[LayerKind], ...] = (*QUANTIZED_KINDS, LinearKind, Conv1DKind)


def register_kind(kind_cls: type[LayerKind], linear: bool) -> None:
    """Add a base layer kind (``linear``: "all-linear" picks it). It is tried before the others,
    so a subclass of nn.Linear gets its own kind."""
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


__all__ = ["KINDS", "LINEAR_KINDS", "Conv1DKind", "Conv2dKind", "EmbeddingKind", "LayerKind", "LinearKind",
           "is_adaptable", "is_linear", "kind_for", "register_kind"]
