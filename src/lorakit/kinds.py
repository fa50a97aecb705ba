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
