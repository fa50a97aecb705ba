"""Initialisations: functions that fill an adapter's factors, not methods of their own.

- default: A Kaiming-uniform, B = 0 (done when the method is built).
- gaussian: A ~ N(0, 1/r²) as PEFT does, B = 0.
- pissa (Meng et al. 2024, arXiv:2404.02948): A, B from the top-r SVD of W.
- gradient-svd: A, B from the top-r singular vectors of dL/dW on a few domain batches, so the
  first steps move along the directions the task's gradient already points to.

PiSSA and gradient-SVD start with B A ≠ 0. Rather than editing W into a residual (which would
leave a changed base for every other adapter), the initial update is recorded as a frozen
offset the forward subtracts, so the model is unchanged at step 0 and W stays the original.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.config import AdapterConfig
from lorakit.errors import ConfigError
from lorakit.methods.lora import LoRA

if TYPE_CHECKING:
    from lorakit.model import AdaptedModel

FULL_SVD_MAX_DIM = 1024  # above this, a randomised SVD (4 power iterations) is accurate and far faster


def initialise(
    model: AdaptedModel, name: str, config: AdapterConfig, gradient_loss: Callable[[nn.Module], torch.Tensor] | None
) -> None:
    if config.init == "default":
        return
    modules = model.adapter_modules(name)
    if config.init == "gaussian":
        for method in modules.values():
            init_gaussian(method)
    elif config.init == "pissa":
        layers = model.layers_of(name)
        for path, method in modules.items():
            init_pissa(method, layers[path].kind.weight_matrix(layers[path].base_layer))
    elif config.init == "gradient-svd":
        assert gradient_loss is not None
        for path, grad in base_weight_gradients(model, list(modules), gradient_loss).items():
            init_from_gradient(modules[path], grad)


@torch.no_grad()
def init_gaussian(method: LoRA) -> None:
    nn.init.normal_(method.lora_A, std=1.0 / method.rank)
    method.lora_B.zero_()


@torch.no_grad()
def init_pissa(method: LoRA, W: torch.Tensor) -> None:
    """s·B A = U_r S_r V_rᵀ (the principal part of W); the forward subtracts it at step 0."""
    U, S, Vh = top_singular_triplets(W.float(), method.rank)
    root = S.sqrt()
    method.lora_A.copy_(root.unsqueeze(1) * Vh)
    method.lora_B.copy_(U * root / method.scaling)
    method.set_offset(method.lora_A, method.lora_B * method.scaling)


@torch.no_grad()
def init_from_gradient(method: LoRA, grad: torch.Tensor) -> None:
    """A = √(S/S₁)·Vᵀ_r, B = U_r·√(S/S₁) from the top singular triplets of −dL/dW.

    The factors span the subspaces the truncated gradient lives in, so the first steps move W
    along it (a random A only sees a random r-dimensional slice of it). Taking the SVD of the
    descent direction −G rather than G matters: the initial product B A then has the sign the
    update needs, so training grows it instead of dragging it through the saddle at B A = 0.
    """
    U, S, Vh = top_singular_triplets(-grad.float(), method.rank)
    weights = (S / S[0].clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
    method.lora_A.copy_(weights.unsqueeze(1) * Vh)
    method.lora_B.copy_(U * weights)
    method.set_offset(method.lora_A, method.lora_B * method.scaling)


def top_singular_triplets(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, r), S (r,), Vh (r, in) of the best rank-r approximation of M."""
    r = min(r, *M.shape)
    if min(M.shape) <= FULL_SVD_MAX_DIM:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    U, S, V = torch.svd_lowrank(M, q=min(r + 8, *M.shape), niter=4)
    return U[:, :r], S[:r], V[:, :r].t()


def base_weight_gradients(
    model: AdaptedModel, paths: list[str], loss_fn: Callable[[nn.Module], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """dL/dW (as (out, in) matrices) of the base weights at ``paths``, leaving no trace behind."""
    layers = model.adapted_layers()
    quantised = [p for p in paths if not layers[p].kind.writable]
    if quantised:
        raise ConfigError(
            f"gradient-svd needs dL/dW of a float base weight, and {quantised[0]} is quantised "
            f"({layers[quantised[0]].kind.name}); use init 'default' or 'pissa' on a quantised base"
        )
    weights = {p: layers[p].base_layer.weight for p in paths}
    previous = {p: w.requires_grad for p, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        loss = loss_fn(model)
        loss.backward()
        grads = {}
        for p, w in weights.items():
            if w.grad is None:
                raise ValueError(f"gradient-svd: the loss does not depend on {p!r}; check the batches reach it")
            grads[p] = layers[p].kind.as_matrix(w.grad).detach().clone()
        return grads
    finally:
        for p, w in weights.items():
            w.grad = None
            w.requires_grad_(previous[p])
        for param in model.parameters():
            param.grad = None
