"""The training path of a low-rank update on a frozen nn.Linear, as one autograd node.

    y = x Wᵀ + bias + s · (x Aᵀ) Bᵀ        W (out, in) frozen, A (r, in), B (out, r)

Under plain autograd the base linear and the update are separate branches, so the backward
forms the input gradient twice, g W and s·(g B) A, each a new input-sized tensor, and sums them
in a third pass. Here the backward writes

    grad_x = g W,  then  grad_x += (s · g B) A     (one GEMM accumulating into it: addmm_)
    grad_A = (s · g B)ᵀ x,   grad_B = s · gᵀ (x Aᵀ),   grad_bias = Σ g

reusing g B for grad_x and grad_A, and saving only x and x Aᵀ for backward (what the separate
branches save too). The forward is the base GEMM followed by the update accumulated into its
output (beta = 1), as in :meth:`lorakit.kinds.LayerKind.add_up_`.

It applies only where it computes exactly what the generic path does: a plain ``nn.Linear`` (its
own ``forward``, no hooks of any kind), a frozen W, one additive adapter without dropout in
effect, every tensor on one device, and no autocast. Everything else takes the generic path.

The factors may have another dtype than the layer: float32 adapters on a bf16 base are the usual
setup on GPUs. Then, as on the generic path, the products run in the layer's dtype on cast
copies of the factors, and the factors' gradients come back in their own dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module


class LowRankLinear(torch.autograd.Function):
    """x Wᵀ + bias + s · (x Aᵀ) Bᵀ with W frozen; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        # The small factors transposed into contiguous copies, in the input's dtype: the skinny
        # GEMMs below run faster on these layouts than on transposed views (measured; BENCHMARKS.md).
        At, Bt = A.to(x.dtype).t().contiguous(), B.to(x.dtype).t().contiguous()  # (in, r), (r, out)
        h = x2 @ At  # (tokens, r)
        out = F.linear(x2, W, bias)  # (tokens, out), a fresh tensor: accumulate into it
        out.addmm_(h, Bt, alpha=scaling)
        # A and B themselves, not the copies: parameters cost no memory to save.
        ctx.save_for_backward(x2 if A.requires_grad else None, h if B.requires_grad else None, W, A, B)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x2, h, W, A, B = ctx.saved_tensors
        need_x, _, need_bias, need_A, need_B, _ = ctx.needs_input_grad
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1])  # (tokens, out)
        grad_x = grad_bias = grad_A = grad_B = None
        if need_x or need_A:
            gB = (g2 @ B.to(g.dtype).t().contiguous().t()).mul_(s)  # (tokens, r): s · g B
            if need_x:
                grad_x = torch.mm(g2, W).addmm_(gB, A.to(g.dtype).t().contiguous().t()).view(ctx.x_shape)
            if need_A:
                grad_A = (gB.t() @ x2).to(A.dtype)  # (r, in)
        if need_B:
            grad_B = (h.t() @ g2).mul_(s).t().to(B.dtype)  # (out, r), a transposed view when no cast
        if need_bias:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, None


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or _module._global_forward_hooks or _module._global_forward_pre_hooks
        or _module._global_backward_hooks or _module._global_backward_pre_hooks
    )


def fused_linear(
    base_layer: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """The adapted output through :class:`LowRankLinear`, or None where the generic path must run."""
    if type(base_layer).forward is not nn.Linear.forward or _has_hooks(base_layer):
        return None
    W, bias = base_layer.weight, base_layer.bias
    if W.requires_grad or not (A.requires_grad or B.requires_grad or x.requires_grad):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None  # autocast picks each op's dtype; the generic path's ops follow it
    layer = (x, W) if bias is None else (x, W, bias)
    if any(t.dtype != W.dtype or t.device != W.device for t in layer) or not W.dtype.is_floating_point:
        return None
    if any(t.device != W.device or not t.dtype.is_floating_point for t in (A, B)):
        return None
    return LowRankLinear.apply(x, W, bias, A, B, scaling)
