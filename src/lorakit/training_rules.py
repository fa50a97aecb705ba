"""Training-time rules that live beside the optimizer, not inside layers.

- :func:`loraplus_param_groups` — LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B learns
  ``ratio`` times faster than A. Which tensors are B-like is each method's ``up_tensors``.
- :class:`DeltaLoRA` — Delta-LoRA (Zi et al. 2023, arXiv:2309.02411): the frozen W also moves,
  W ← W + c·s·(B' A' − B A) after every optimizer step from step K on.

LoRA-FA needs no rule: its A is frozen when the method is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import ConfigError
from lorakit.methods.lora import LoRA

if TYPE_CHECKING:
    from lorakit.model import AdaptedModel

def loraplus_param_groups(
    model: AdaptedModel, lr: float, ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Parameter groups for any torch optimizer: ratio × lr for the up side (each method's
    ``up_tensors``: LoRA's B, VeRA's b), lr for everything else that trains.

    Tensors that are neither A nor B (DoRA's magnitude, trainable head copies) get the base lr,
    as in the LoRA+ paper's reference implementation.
    """
    up = {id(getattr(method, tensor)) for layer in model.adapted_layers().values()
          for method in layer.adapters.values() for tensor in method.up_tensors}
    a_side, b_side = [], []
    for p in model.parameters():
        if p.requires_grad:
            (b_side if id(p) in up else a_side).append(p)
    if not b_side:
        raise ConfigError("LoRA+ found no trainable up-side tensors (B): is an adapter active, and does its method "
                          "declare up_tensors?")
    # The group names keep LoRA's spelling (logged, and read by tools) whatever the methods call their tensors.
    return [
        {"params": a_side, "lr": lr, "weight_decay": weight_decay, "name": "lora_A+other"},
        {"params": b_side, "lr": lr * ratio, "weight_decay": weight_decay, "name": "lora_B"},
    ]


class DeltaLoRA:
    """Call :meth:`step` right after each ``optimizer.step()``.

    From step ``start_step`` (K) on, the base weight of every layer of ``adapter`` moves by
    c·s·(B_{t+1} A_{t+1} − B_t A_t). The moves telescope, so at step T the base has moved by
    exactly c·s·(B_T A_T − B_K A_K), a rank-2r matrix; it is recorded on the adapter as its
    ``shift`` so files export the whole change as a plain LoRA on the untouched base, and
    deleting the adapter restores W. The paper's defaults: c = 2 (update ratio), K = 500.
    """

    def __init__(self, model: AdaptedModel, adapter: str = "default", c: float = 2.0, start_step: int = 500) -> None:
        methods = model.adapter_modules(adapter)
        if not all(type(m) is LoRA for m in methods.values()):
            raise ConfigError("Delta-LoRA needs plain LoRA adapters (method 'lora')")
        if any(m.offset_A.shape[0] for m in methods.values()):
            raise ConfigError("Delta-LoRA with a PiSSA or gradient-SVD init is not supported; use the default init")
        self.layers = model.layers_of(adapter)
        if any(not layer.kind.writable for layer in self.layers.values()):
            raise ConfigError("Delta-LoRA moves the base weight, which a 4-bit/8-bit quantised base cannot hold; "
                              "train it on a full-precision base")
        self.methods = methods
        self.c = c
        self.start_step = start_step
        self.steps = 0
        self._previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._at_start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        if self.steps < self.start_step:
            return
        for path, method in self.methods.items():
            A, B = method.lora_A.detach(), method.lora_B.detach()
            if path not in self._previous:  # step K: start tracking, nothing moves yet
                self._at_start[path] = (A.clone(), B.clone())
            else:
                A_prev, B_prev = self._previous[path]
                cs = self.c * method.scaling
                W = self.layers[path].kind.weight_matrix(self.layers[path].base_layer)
                moved = W.float().addmm_(B.float(), A.float(), alpha=cs)
                W.copy_(moved.addmm_(B_prev.float(), A_prev.float(), alpha=-cs))
                self._record_shift(method, path)
            self._previous[path] = (A.clone(), B.clone())

    def _record_shift(self, method: LoRA, path: str) -> None:
        A_K, B_K = self._at_start[path]
        cs = self.c * method.scaling
        method.shift_A = torch.cat([method.lora_A.detach(), A_K]).clone()
        method.shift_B = torch.cat([method.lora_B.detach() * cs, -cs * B_K], dim=1).clone()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "c": self.c, "start_step": self.start_step,
                "previous": self._previous, "at_start": self._at_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.c, self.start_step = state["steps"], state["c"], state["start_step"]
        self._previous, self._at_start = state["previous"], state["at_start"]
