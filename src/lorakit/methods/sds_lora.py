"""SDS-LoRA (Oh, Baik, Lee 2026, arXiv:2606.16454): LoRA whose factors learn through the
orthonormal bases of their subspaces.

Only the backward differs from LoRA. The forward (h = W x + s·B A x), the inits, the files
(plain PEFT LoRA, ``peft_type`` "LORA"), merging, mixed batches and combining are LoRA's, so a
trained SDS-LoRA adapter is an ordinary LoRA adapter for PEFT and for serving.

The rule, in lorakit's reading (the paper's abstract states it; its equations could not be read).
With the thin QR factorisations

    B = Q_B R_B   (out, r),      Aᵀ = Q_A R_A   (in, r),      R upper triangular, diagonal > 0,

and G = ∂L/∂(B A) = s · Σ_tokens gᵀ x (g = ∂L/∂y), LoRA's gradients are

    ∇B = G Aᵀ = G Q_A R_A,       ∇A = Bᵀ G = R_Bᵀ Q_Bᵀ G.

The singular values of A and B (inside R_A, R_B) scale the full-weight gradient G unevenly, which
makes LoRA's convergence depend on the factors' condition numbers. SDS-LoRA removes the R factors:

    ∇B ← G Q_A,                  ∇A ← Q_Bᵀ G.

G (out × in) is never formed: G Q_A = s·gᵀ (x Q_A) and Q_Bᵀ G = s·(g Q_B)ᵀ x are r-wide products,
the same shapes as LoRA's own backward, computed by a custom autograd node around the adapter's
part of the layer output (:class:`_SDSUpdate`). The layer input's gradient stays LoRA's, since
the forward is LoRA's.

Why a positive diagonal: it makes the thin QR of a full-rank matrix unique, so the gradients do not
depend on the sign choices of the QR routine, and factors with orthonormal rows/columns (R = I)
get exactly LoRA's gradients.

Rank-deficient factors, the B = 0 start included: Q_B is then not determined by B. lorakit gives
the other factor LoRA's own gradient there: ∇A ← Bᵀ G while B is rank-deficient (∇B ← G Aᵀ while
A is). At B = 0 that is ∇A = 0, exactly what LoRA does, while B receives G Q_A; so the first step
moves B only, along G Q_A (generically of rank r), and A starts moving from the second step with
its SDS gradient. Completing the basis arbitrarily instead would push A along r directions chosen
by the QR routine (the first r output coordinates, for Householder QR): a bias that follows the
order of the layer's output features, not the task. A factor counts as rank-deficient when it has
fewer rows than r, or when its smallest |R_ii| is at most max(rows, r)·eps times its largest (the
usual numerical-rank tolerance); the test runs on the device (``torch.where``), so a training
step never waits on the host.

What runs where: the custom node runs while A or B trains (grad mode on). Inference, and a frozen
adapter, run LoRA's code unchanged. LoRA's one-node training path (:mod:`lorakit.fused`) has
LoRA's backward, so :meth:`SDSLoRA.fused_factors` declines it while A or B trains; mixed batches
never train in lorakit (their stacks carry no autograd history).

Cost per adapted layer and step: two thin QRs (in × r and out × r, in float32 at least) and two
r-wide products more than LoRA's backward (x Q_A, and g Q_B beside g B).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from lorakit.kinds_base import LayerKind
from lorakit.methods.lora import LoRA


def orthonormal_basis(F: torch.Tensor) -> torch.Tensor:
    """Q of the thin QR F = Q R with a positive diagonal (F (n, r), full column rank); F itself
    (so that the gradient it enters is LoRA's) when F is numerically rank-deficient.

    Computed in float32 at least, outside autocast (a QR in bf16 would lose the basis).
    """
    n, r = F.shape
    work = F.detach().to(torch.promote_types(F.dtype, torch.float32))
    if n < r:
        return work  # rank < r for certain
    with torch.autocast(work.device.type, enabled=False):
        Q, R = torch.linalg.qr(work)
    diagonal = R.diagonal()
    Q = Q * torch.where(diagonal < 0, -1.0, 1.0).to(Q.dtype)
    size = diagonal.abs()
    full_rank = size.min() > size.max() * (max(n, r) * torch.finfo(work.dtype).eps)
    return torch.where(full_rank, Q, work)


def _follows_linear_convention(kind: LayerKind) -> bool:
    """A x = x Aᵀ and B h = h Bᵀ on the last dimension (Linear, Conv1D, quantised linears)."""
    return type(kind).down is LayerKind.down and type(kind).up is LayerKind.up


def _full_factors(A, B, offset_A, offset_B, scaling):
    """(A, s·B) with the frozen offset appended, as LoRA.factors() builds them."""
    if offset_A.shape[0] == 0:
        return A, B * scaling
    return torch.cat([A, offset_A]), torch.cat([B * scaling, offset_B], dim=1)


def _lora_update(kind: LayerKind, out, x, A, B, offset_A, offset_B, scaling):
    """LoRA's ``add_update_`` after dropout: out + s·B A x (+ the offset), into ``out`` where it can."""
    if offset_A.shape[0] == 0:
        return kind.add_up_(out, kind.down(x, A), B, scaling)
    A_full, B_full = _full_factors(A, B, offset_A, offset_B, scaling)
    return kind.add_up_(out, kind.down(x, A_full), B_full)


class _SDSUpdate(torch.autograd.Function):
    """out + s·B A x with LoRA's forward and SDS-LoRA's gradients for A and B (module docstring)."""

    @staticmethod
    def forward(ctx, out, x, A, B, offset_A, offset_B, scaling: float, kind: LayerKind):
        # LoRA's own operations, with the branches add_up_ takes under autograd (grad mode is off
        # inside a Function's forward): the same kernels, so the same values as LoRA's forward.
        # Every input is detached, so nothing is recorded.
        owned = out.detach()
        with torch.enable_grad():
            result = _lora_update(kind, owned, x.detach(), A.detach(), B.detach(), offset_A, offset_B, scaling)
        ctx.save_for_backward(x, A, B, offset_A, offset_B)
        ctx.scaling, ctx.kind = scaling, kind
        if result is owned:  # written into the caller's tensor (it owns it: LoRA.forward's contract)
            ctx.mark_dirty(out)
            return out
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, A, B, offset_A, offset_B = ctx.saved_tensors
        need_out, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        kind, s = ctx.kind, ctx.scaling
        basis_A = orthonormal_basis(A.t()) if need_B else None  # Q_A (in, r), or Aᵀ
        basis_B = orthonormal_basis(B) if need_A else None  # Q_B (out, r), or B
        grads = _linear_grads if _follows_linear_convention(kind) else _generic_grads
        grad_x, grad_A, grad_B = grads(kind, g, x, A, B, offset_A, offset_B, s, basis_A, basis_B, need_x)
        return (g if need_out else None), grad_x, grad_A, grad_B, None, None, None, None


def _linear_grads(kind, g, x, A, B, offset_A, offset_B, s, basis_A, basis_B, need_x):
    """The gradients as explicit r-wide GEMMs, in the output's dtype (as LoRA's products run)."""
    dt = g.dtype
    g2 = g.reshape(-1, g.shape[-1])  # (tokens, out)
    x2 = x.reshape(-1, x.shape[-1]).to(dt)  # (tokens, in)
    grad_x = grad_A = grad_B = None
    A_full, B_full = _full_factors(A, B, offset_A, offset_B, s)
    # g B (for the input) and g Q_B (for A) in one pass over g: these r-wide GEMMs are bound by reading g
    ups = ([B_full] if need_x else []) + ([basis_B.to(B_full.dtype) * s] if basis_B is not None else [])
    if ups:
        g_up = g2 @ torch.cat(ups, dim=1).to(dt)  # (tokens, r' + r)
        if need_x:
            grad_x = (g_up[:, :A_full.shape[0]] @ A_full.to(dt)).view(x.shape).to(x.dtype)
        if basis_B is not None:
            grad_A = (g_up[:, g_up.shape[1] - A.shape[0]:].t() @ x2).to(A.dtype)  # Q_Bᵀ G (r, in)
    if basis_A is not None:
        grad_B = (g2.t() @ (x2 @ basis_A.to(dt))).mul_(s).to(B.dtype)  # G Q_A (out, r)
    return grad_x, grad_A, grad_B


def _generic_grads(kind, g, x, A, B, offset_A, offset_B, s, basis_A, basis_B, need_x):
    """The same gradients through the kind's own ``down`` and ``up`` (Embedding, Conv2d, any other
    kind): vector-Jacobian products of maps that are linear in each argument."""
    grad_x = grad_A = grad_B = None
    with torch.enable_grad():
        if need_x:
            A_full, B_full = _full_factors(A, B, offset_A, offset_B, s)
            x_in = x.detach().requires_grad_()
            h = kind.down(x_in, A_full.detach())
            grad_h = _vjp(lambda t: kind.up(t, B_full.detach()), h.detach(), g)
            grad_x = torch.autograd.grad(h, x_in, grad_h.to(h.dtype))[0]
        if basis_B is not None:
            A_in = A.detach().requires_grad_()
            h = kind.down(x, A_in)
            grad_h = _vjp(lambda t: kind.up(t, basis_B.to(A.dtype)), h.detach(), g) * s
            grad_A = torch.autograd.grad(h, A_in, grad_h.to(h.dtype))[0].to(A.dtype)
        if basis_A is not None:
            with torch.no_grad():
                h = kind.down(x, basis_A.t().to(A.dtype))  # (Q_Aᵀ) x
            grad_B = (_vjp(lambda b: kind.up(h, b), B.detach(), g) * s).to(B.dtype)
    return grad_x, grad_A, grad_B


def _vjp(fn, at: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    """(∂fn/∂t at t = ``at``)ᵀ · cotangent."""
    leaf = at.detach().requires_grad_()
    out = fn(leaf)
    return torch.autograd.grad(out, leaf, cotangent.to(out.dtype))[0]


class SDSLoRA(LoRA):
    """LoRA with SDS-LoRA's backward: ∇B = G Q_A, ∇A = Q_Bᵀ G (module docstring)."""

    method_name = "sds-lora"
    title = "SDS-LoRA"

    def _trains(self) -> bool:
        return self.lora_A.requires_grad or self.lora_B.requires_grad

    def add_update_(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self._trains()):
            return super().add_update_(x, out)  # inference, a frozen adapter: LoRA's gradients are the same
        return _SDSUpdate.apply(out, self.dropout(x), self.lora_A, self.lora_B, self.offset_A, self.offset_B,
                                self.scaling, self.kind)

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if self._trains():
            return None  # the fused node's backward is LoRA's: training takes add_update_'s node
        return super().fused_factors()
