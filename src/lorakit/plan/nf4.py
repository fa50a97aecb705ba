"""NF4 (QLoRA) in a plan: the bytes bitsandbytes stores per layer, and a shape-only stand-in layer.

bitsandbytes cannot quantise a weight that has no values, so a plan swaps every layer
``lorakit.quantize.quantize_model`` would quantise for :class:`PlannedLinear4bit`. It holds tensors of
exactly the sizes bitsandbytes stores (with ``compress_statistics=True``, as lorakit quantises):

    packed codes      ceil(n / 2)            uint8   two 4-bit codes per byte
    absmax            ceil(n / 64)           uint8   one scale per block of 64, itself quantised
    nested absmax     ceil(blocks / 256)     fp32    the scales' own scale, per 256 blocks
    offset            1                      fp32    the mean subtracted from the scales
    code, nested code 16 and 256             fp32    the NF4 and the 8-bit dynamic lookup tables

and computes as ``bnb.nn.Linear4bit`` does: the input cast to the compute dtype (lorakit's:
float32), a product with the dequantised weight outside autocast (bitsandbytes' own op), the
output cast back, and nothing saved for backward but the packed weight itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kinds import register_kind
from lorakit.kinds_base import LayerKind
from lorakit.targets import output_head_names

BLOCKSIZE = 64  # bitsandbytes' default block of one absmax scale
NESTED_BLOCKSIZE = 256  # double quantisation: one float32 scale per 256 block scales
NF4_CODE, NESTED_CODE = 16, 256  # float32 lookup tables kept per layer


def nf4_weight_bytes(out_features: int, in_features: int) -> int:
    """Bytes bitsandbytes holds for one NF4 weight with double-quantised statistics (bias not included)."""
    n = out_features * in_features
    blocks = -(-n // BLOCKSIZE)
    nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
    return -(-n // 2) + blocks + 4 * nested_blocks + 4 + 4 * (NF4_CODE + NESTED_CODE)


class PlannedLinear4bit(nn.Module):
    """Stands in for ``bnb.nn.Linear4bit`` (NF4, double quantised) in a shape-only model."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        self.original_dtype = linear.weight.dtype  # what a dequantised copy comes back as
        n = self.in_features * self.out_features
        blocks = -(-n // BLOCKSIZE)
        device = linear.weight.device
        self.weight = nn.Parameter(torch.empty(-(-n // 2), 1, dtype=torch.uint8, device=device), requires_grad=False)
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("nested_absmax", torch.empty(-(-blocks // NESTED_BLOCKSIZE), device=device))
        self.register_buffer("offset", torch.empty((), device=device))
        self.register_buffer("code", torch.empty(NF4_CODE, device=device))
        self.register_buffer("nested_code", torch.empty(NESTED_CODE, device=device))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _Matmul4bit.apply(x, self.weight, bias, self.out_features).to(given)


class _Matmul4bit(torch.autograd.Function):
    """bitsandbytes' MatMul4Bit: the weight is dequantised (a temporary) for the product and again in backward."""

    @staticmethod
    def forward(ctx, x, packed, bias, out_features: int):
        with torch.autocast(x.device.type, enabled=False):  # a custom op: autocast does not reach it
            dequantised = x.new_empty(out_features, x.shape[-1])
            out = F.linear(x, dequantised, bias)
        ctx.save_for_backward(packed)  # a parameter: no memory of its own
        ctx.shape = (out_features, x.shape[-1])
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ grad.new_empty(ctx.shape)
        return grad_x, None, None, None


class PlannedLinear4bitKind(LayerKind):
    """The kind lorakit gives bitsandbytes' Linear4bit, for the stand-in: Linear's A x and B h,
    nothing written into W, adapters added out of place."""

    name = "Linear4bit"
    writable = False
    inplace_output = False

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, PlannedLinear4bit)

    def __init__(self, module: nn.Module) -> None:
        self.out_features, self.in_features = module.out_features, module.in_features

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        """A fresh dequantised W, as bitsandbytes makes one for DoRA's norms and for merges."""
        return module.weight.new_empty(self.out_features, self.in_features, dtype=module.original_dtype)


def quantize_planned(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> int:
    """Swap the layers ``quantize_model`` would quantise (every exact nn.Linear but the output heads)
    for stand-ins, in place; returns how many. The stand-in's kind is registered on first use (it
    matches nothing else), so "all-linear" picks the stand-ins as it picks bitsandbytes' layers."""
    register_kind(PlannedLinear4bitKind, linear=True)
    heads = output_head_names(model)
    chosen = [name for name, m in model.named_modules() if type(m) is nn.Linear and name not in heads]
    for name in chosen:
        parent_path, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, PlannedLinear4bit(getattr(parent, leaf), compute_dtype))
    return len(chosen)
