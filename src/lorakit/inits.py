"""Initialisations: how an adapter's tensors are filled before training, not methods of their own.

- default: whatever the method builds (LoRA: A Kaiming-uniform, B = 0).
- gaussian: A ~ N(0, 1/r²) as PEFT does, B = 0.
- pissa (Meng et al. 2024, arXiv:2404.02948): A, B from the top-r SVD of W.
- gradient-svd: A, B from the top-r singular vectors of dL/dW on a few domain batches, so the
  first steps move along the directions the task's gradient already points to.

Each method lists the inits it supports (``AdapterMethod.inits``; AdapterConfig refuses the
others) and fills its own tensors (``AdapterMethod.initialise``); this module runs them and
holds what they share: dL/dW of the base weights and the top singular triplets of a matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.config import AdapterConfig
    from lorakit.layer import AdaptedLayer

FULL_SVD_MAX_DIM = 1024  # above this, a randomised SVD (4 power iterations) is accurate and far faster


def initialise(
    model: nn.Module, layers: Mapping[str, AdaptedLayer], name: str, config: AdapterConfig,
    gradient_loss: Callable[[nn.Module], torch.Tensor] | None,
) -> None:
    """Fill adapter ``name`` on ``layers`` (module path → layer) for ``config.init``.

    ``gradient_loss(model)`` returns the loss whose dL/dW "gradient-svd" starts from.
    """
    if config.init == "default":
        return
    gradients: dict[str, torch.Tensor] = {}
    if config.init == "gradient-svd":
        assert gradient_loss is not None
        gradients = base_weight_gradients(model, layers, gradient_loss)
    for path, layer in layers.items():
        layer.adapters[name].initialise(config.init, layer.base_layer, gradients.get(path))


def top_singular_triplets(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, r), S (r,), Vh (r, in) of the best rank-r approximation of M."""
    r = min(r, *M.shape)
    if min(M.shape) <= FULL_SVD_MAX_DIM:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    U, S, V = torch.svd_lowrank(M, q=min(r + 8, *M.shape), niter=4)
    return U[:, :r], S[:r], V[:, :r].t()


def base_weight_gradients(
    model: nn.Module, layers: Mapping[str, AdaptedLayer], loss_fn: Callable[[nn.Module], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """dL/dW (as (out, in) matrices) of the base weights of ``layers`` (path → layer), leaving no trace behind."""
    paths = list(layers)
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
