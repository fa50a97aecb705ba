"""The training path of a low-rank update on a frozen nn.Linear, as one autograd node.

    y = c ⊙ (x Wᵀ + bias + s · ((x Aᵀ) ⊙ d) (b ⊙ B)ᵀ) + (1 − c) ⊙ bias

with W (out, in) frozen, A (r, in), B (out, r), and three optional vectors (:class:`FusedUpdate`):
d (r) and b (out) scale the rank features and the update's outputs (VeRA's λ_d and λ_b: they
multiply a weight-sized copy of its frozen projection inside the node, never an activation), and
c (out) scales the whole output, bias excepted (DoRA's m / ||W + s·B A||, the norm a constant).
Plain LoRA has none of them:

    y = x Wᵀ + bias + s · (x Aᵀ) Bᵀ

Under plain autograd the base linear and the update are separate branches, so the backward
forms the input gradient twice, g W and s·(g B) A, each a new input-sized tensor, and sums them
in a third pass. Here, with g' = c ⊙ g and B'' = (b ⊙ B) ⊙ dᵀ (weight-sized, built inside the node;
B itself for LoRA), the update is s · (x Aᵀ) B''ᵀ and the backward writes

    gH = s · g' B''  (tokens × r)     grad_x = g' W,  then  grad_x += gH A   (addmm_ into it)
    grad_A = gHᵀ x                    G = s · g'ᵀ (x Aᵀ)  (out × r)
    grad_B = G ⊙ b ⊙ dᵀ   grad_b = Σ_r G ⊙ B ⊙ dᵀ   grad_d = Σ_out G ⊙ b ⊙ B
    grad_c = Σ_tokens g ⊙ (output before c − bias)          grad_bias = Σ_tokens g

reusing gH for grad_x and grad_A, and G for B, b and d. What it keeps for backward is what those
need and no more: x only when A trains (VeRA's A is frozen, so VeRA keeps only x Aᵀ, tokens × r),
x Aᵀ when B, b or d train, and the output before c only when c trains (DoRA's magnitude). W, the
factors and the vectors are parameters or their slices, which cost nothing to keep.

x itself is not kept when the graph already holds what rebuilds it exactly (:func:`rebuilder`):
the input of a gated MLP's down projection is act(gate) ⊙ up, whose two operands the product's
own node keeps for its backward, and a GELU's output is rebuilt from the input GELU keeps. Those
are recomputed in backward, one elementwise op, instead of holding a second copy of the input
(not under saved-tensor hooks that may unpack once, such as non-reentrant checkpointing).

The adapter's dropout, on the update's input only, runs in the node too, drawing what
``nn.Dropout`` draws; the node keeps its bool mask (one byte per element) rather than the dropped
copy, and forms the dropped input again in backward.

It applies only where it computes exactly what the generic path does: a plain ``nn.Linear`` (its
own ``forward``, no hooks of any kind), a frozen W, one adapter that hands a :class:`FusedUpdate`,
every tensor on one device, and no autocast. Everything else takes the generic path.

The factors may have another dtype than the layer: float32 adapters on a bf16 base are the usual
setup on GPUs. Then, as on the generic path, the products run in the layer's dtype on cast
copies of the factors, and the factors' gradients come back in their own dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module


@dataclasses.dataclass(frozen=True)
class FusedUpdate:
    """A method's update as the one-node path computes it (see the module docstring).

    ``d`` and ``b`` are kept apart from A and B rather than multiplied in by the method, so that
    a frozen A with a trained ``d`` (VeRA) needs only x Aᵀ for its gradient, not x.
    """

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float = 1.0
    d: torch.Tensor | None = None  # (r,): scales the rank features, A' = d ⊙ A
    b: torch.Tensor | None = None  # (out,): scales the update's outputs, B' = b ⊙ B
    output_scale: torch.Tensor | None = None  # (out,): c, on the whole output but the bias
    dropout: float = 0.0  # p of the adapter's dropout on x (the update's input only), 0: none

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.A, self.B, self.d, self.b, self.output_scale) if t is not None)


def _transposed(M: torch.Tensor, dtype: torch.dtype, factor: torch.Tensor | float = 1.0) -> torch.Tensor:
    """factor ⊙ Mᵀ as a contiguous tensor of ``dtype``: cast, transpose and scale in one kernel.

    The skinny GEMMs run faster on these layouts than on transposed views (measured; BENCHMARKS.md),
    and one kernel instead of a cast, a copy and a product matters where a step is host-bound.
    """
    out = torch.empty(M.shape[1], M.shape[0], dtype=dtype, device=M.device)
    if isinstance(factor, float) and factor == 1.0:
        return out.copy_(M.t())
    return torch.mul(M.t(), factor, out=out)


def _vectors(d: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """V with V_ko = d_k · b_o, shaped to scale Bᵀ (r, out); None when there are no vectors."""
    if d is None:
        return b
    return d.unsqueeze(1) if b is None else torch.outer(d, b)


class LowRankLinear(torch.autograd.Function):
    """The adapted Linear's output with W frozen; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, d, b, c, scaling: float, p: float):
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        dtype = x.dtype
        V = _vectors(d, b)
        # The update's input: x, or its dropout (the same draw as nn.Dropout's), whose bool mask is
        # kept instead of the dropped copy: x is often kept or rebuilt anyway, and shared by q, k, v.
        xd, mask = (x2, None) if p == 0 else torch.native_dropout(x2, p, True)
        h0 = xd @ _transposed(A, dtype)  # (tokens, r)
        out = F.linear(x2, W, bias)  # (tokens, out), a fresh tensor: accumulate into it
        out.addmm_(h0, _transposed(B, dtype, 1.0 if V is None else V), alpha=scaling)  # + s · h0 B''ᵀ
        y = out
        if c is not None:  # c ⊙ (out − bias) + bias: the bias term is one vector
            c_ = c.to(dtype)
            y = out * c_ if bias is None else torch.addcmul((1 - c_) * bias, out, c_)

        producer = rebuilder(x) if A.requires_grad else None
        keep_x = A.requires_grad and producer is None
        keep_h0 = any(t is not None and t.requires_grad for t in (B, d, b))
        keep_out = c is not None and c.requires_grad
        keep_mask = mask is not None and (A.requires_grad or x.requires_grad)
        # Parameters (and VeRA's projection slices) cost no memory to keep.
        ctx.save_for_backward(x2 if keep_x else None, h0 if keep_h0 else None, out if keep_out else None,
                              mask if keep_mask else None, W, bias, A, B, d, b, c)
        ctx.producer = producer
        ctx.scaling = scaling
        ctx.dropout_scale = 1.0 / (1.0 - p)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        # With B'' = (b ⊙ B) ⊙ dᵀ (B itself for LoRA) the update is s · (x Aᵀ) B''ᵀ, so
        # dL/d(x Aᵀ) = s · g' B'' and dL/dB'' = s · g'ᵀ (x Aᵀ) =: G, from which B, b and d take theirs.
        x2, h0, out, mask, W, bias, A, B, d, b, c = ctx.saved_tensors
        need_x, _, need_bias, need_A, need_B, need_d, need_b, need_c, _, _ = ctx.needs_input_grad
        s, dtype = ctx.scaling, g.dtype
        g2 = g.reshape(-1, g.shape[-1])  # (tokens, out)
        grad_x = grad_bias = grad_A = grad_B = grad_d = grad_b = grad_c = None
        if need_c:
            grad_c = (g2 * out).sum(0)
            if bias is not None:
                grad_c = grad_c - bias * g2.sum(0)
            grad_c = grad_c.to(c.dtype)
        if need_bias:
            grad_bias = g2.sum(0)
        gz = g2 if c is None else g2 * c.to(dtype)  # the gradient of the output before c
        V = _vectors(d, b)
        if need_x or need_A:
            # s · g' B'' as one GEMM on s·B''ᵀ (without vectors s folds into the cast; with them the
            # consumers take it, and VeRA's s is 1)
            gH = gz @ _transposed(B, dtype, s if V is None else V).t()  # (tokens, r)
            s_left = 1.0 if V is None else s
            if need_x:
                At = _transposed(A, dtype).t()  # (r, in), column-major
                if mask is None:
                    grad_x = torch.mm(gz, W).addmm_(gH, At, alpha=s_left)
                else:  # the update's share passes back through the dropout (where(): the fastest masking)
                    grad_x = torch.mm(gz, W).add_(torch.where(mask, gH @ At, 0), alpha=s_left * ctx.dropout_scale)
                grad_x = grad_x.view(ctx.x_shape)
            if need_A:
                x2 = x2 if ctx.producer is None else rebuild(ctx.producer).reshape(-1, ctx.x_shape[-1])
                if mask is not None:  # the dropped input is x masked, times the dropout's scale
                    x2 = torch.where(mask, x2, 0)
                    s_left *= ctx.dropout_scale
                grad_A = (gH.t() @ x2).to(A.dtype)  # (r, in)
                if s_left != 1.0:
                    grad_A.mul_(s_left)
        if need_B or need_b or need_d:
            G = h0.t() @ gz  # (r, out): Gᵀ / s
            if V is None:
                grad_B = _transposed(G, B.dtype, s)  # (out, r)
            else:
                Gf = torch.mul(G, s, out=torch.empty(G.shape, dtype=B.dtype, device=G.device))
                if need_B:
                    grad_B = (Gf * V).t()
                if need_b or need_d:
                    GB = Gf * B.t()  # (r, out): G_ok B_ok, transposed
                    if need_b:
                        grad_b = (GB.sum(0) if d is None else d @ GB).to(b.dtype)
                    if need_d:
                        grad_d = (GB.sum(1) if b is None else GB @ b).to(d.dtype)
        return grad_x, None, grad_bias, grad_A, grad_B, grad_d, grad_b, grad_c, None, None


# -- rebuilding the input from what the graph keeps anyway ----------------------------------------
def rebuilder(x: torch.Tensor) -> torch.autograd.graph.Node | None:
    """The node that made ``x`` when it keeps everything that recomputes ``x`` exactly, else None.

    Safe by construction: ``x`` must be that node's own output, never changed in place since
    (version 0, not a view), and autograd checks on unpacking that the kept operands were not
    changed either. A product's node keeps both operands only when both need gradients (each
    operand's gradient needs the other), which is what its two edges say. Under ``torch.compile``
    the node is not inspected.

    Nor under saved-tensor hooks other than :func:`saved_tensors_observer`'s: the operands are then
    kept by those hooks, which may allow one unpacking only (non-reentrant checkpointing does, and
    it drops the region's saved tensors anyway, x included, so there is nothing to win there).
    """
    node = x.grad_fn
    if node is None or x._version != 0 or x._is_view() or torch.compiler.is_compiling() or _foreign_hooks():
        return None
    name = node.name()
    if name == "MulBackward0":
        edges = node.next_functions
        return node if len(edges) == 2 and all(fn is not None for fn, _ in edges) else None
    if name == "GeluBackward0":
        return node
    return None


def _unchanged(t: torch.Tensor) -> torch.Tensor:
    return t


def saved_tensors_observer(see: Callable[[torch.Tensor], object]) -> torch.autograd.graph.saved_tensors_hooks:
    """Saved-tensor hooks that call ``see`` on every tensor autograd keeps and keep it unchanged.

    Unpacking them returns the tensor itself, any number of times, so the one-node path rebuilds
    inputs under them as it does without hooks: what a benchmark counts through them is what runs.
    """
    def pack(t: torch.Tensor) -> torch.Tensor:
        see(t)
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, _unchanged)


def _foreign_hooks() -> bool:
    """Saved-tensor hooks are in effect, and not :func:`saved_tensors_observer`'s."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True  # cannot tell: assume hooks that unpack once
    hooks = top(False)
    return hooks is not None and hooks[1] is not _unchanged


def rebuild(node: torch.autograd.graph.Node) -> torch.Tensor:
    """The output of a node :func:`rebuilder` accepted, recomputed from what the node keeps."""
    if node.name() == "MulBackward0":
        self, other = node._saved_self, node._saved_other
        if self is None or other is None:
            raise RuntimeError("lorakit: the product that made a fused layer's input no longer holds its operands")
        return self * other
    return F.gelu(node._saved_self, approximate=node._saved_approximate)


# -- when the one-node path applies ---------------------------------------------------------------
def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or _module._global_forward_hooks or _module._global_forward_pre_hooks
        or _module._global_backward_hooks or _module._global_backward_pre_hooks
    )


def accepts_base(base_layer: nn.Module, x: torch.Tensor) -> bool:
    """The base layer and input allow the one-node path (checked before a method builds its update,
    which for DoRA reads the weight)."""
    if type(base_layer).forward is not nn.Linear.forward or _has_hooks(base_layer):
        return False
    W, bias = base_layer.weight, base_layer.bias
    if W.requires_grad or not W.dtype.is_floating_point or torch.is_autocast_enabled(x.device.type):
        return False  # autocast picks each op's dtype; the generic path's ops follow it
    layer = (x, W) if bias is None else (x, W, bias)
    return all(t.dtype == W.dtype and t.device == W.device for t in layer)


def fused_linear(base_layer: nn.Module, x: torch.Tensor, update: FusedUpdate) -> torch.Tensor | None:
    """The adapted output through :class:`LowRankLinear`, or None where the generic path must run."""
    if not accepts_base(base_layer, x):
        return None
    tensors = update.tensors()
    if not (x.requires_grad or any(t.requires_grad for t in tensors)):
        return None  # nothing to differentiate: the generic path is as fast
    W = base_layer.weight
    if any(t.device != W.device or not t.dtype.is_floating_point for t in tensors):
        return None
    u = update
    return LowRankLinear.apply(x, W, base_layer.bias, u.A, u.B, u.d, u.b, u.output_scale, u.scaling, u.dropout)
