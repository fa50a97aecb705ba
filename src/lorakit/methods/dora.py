"""DoRA (Liu et al. 2024, arXiv:2402.09353): weight-decomposed low-rank adaptation.

    W' = m ⊙ (W + s·B A) / ||W + s·B A||      (norm of each output row; m starts at ||W||)

As in the paper (section 4.3) the norm is treated as a constant in backward. The forward reuses
the base output instead of recomputing W x, and adds the low-rank update into it in place:

    y' = (m / n) ⊙ (y − bias + s·B A x) + bias = (m / n) ⊙ (y + s·B A x) + (1 − m / n) ⊙ bias

and the row norms come from low-rank products, never from an (out, in) matrix:

    ||W + s·BA||²_i = ||W_i||² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·(B (A Aᵀ) Bᵀ)_ii

||W_i||² is cached while W is unchanged; the whole norm is cached while A, B and W are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.fused import FusedUpdate
from lorakit.kinds_base import LayerKind
from lorakit.methods.base import AdapterMethod, PerModule
from lorakit.methods.lora import LoRA

if TYPE_CHECKING:
    from lorakit.config import AdapterConfig

MAGNITUDE = "lora_magnitude_vector"


class DoRA(LoRA):
    method_name = "dora"
    title = "DoRA"
    additive = False
    reads_base_weight = True  # the row norm ||W + s·B A||
    trainable = ("lora_A", "lora_B", "lora_magnitude_vector")
    inits = ("default", "gaussian")  # PiSSA / gradient-SVD offsets are not part of DoRA's norm

    def __init__(self, kind: LayerKind, rank: int, scaling: float, dropout: float) -> None:
        super().__init__(kind, rank, scaling, dropout)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(kind.out_features))
        self._w_sq_key: tuple | None = None
        self._w_sq: torch.Tensor | None = None
        self._norm_key: tuple | None = None
        self._norm: torch.Tensor | None = None
        self._merged_norm: torch.Tensor | None = None
        # The norm is reused while the version counters of W, A and B are unchanged. FSDP
        # (``lorakit train --shard``) refills its gathered copies of them in place without bumping
        # those counters, so sharding turns the reuse off (:func:`lorakit.train.sharding.shard_model`).
        self.reuse_norm_by_version = True

    def attach(self, base_layer: nn.Module) -> None:
        if base_layer.weight.device.type != "meta":  # a meta base has no norms to read
            self.init_magnitude(base_layer)

    def output_scale(self, base_layer: nn.Module) -> torch.Tensor:
        return self.lora_magnitude_vector / self.weight_norm(base_layer)

    def take_combination(self, A: torch.Tensor, B_scaled: torch.Tensor,
                         inputs: list[tuple[AdapterMethod, float]]) -> None:
        """The low-rank parts add; the magnitude vectors average with the weights."""
        super().take_combination(A, B_scaled, inputs)
        total = sum(w for _, w in inputs)
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(sum(w * m.lora_magnitude_vector for m, w in inputs) / total)

    # -- files: PEFT's LoRA with use_dora ------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().file_tensors(), MAGNITUDE: self.kind.magnitude_to_file(self.lora_magnitude_vector)}

    def file_copies(self, tensors: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [*super().file_copies(tensors), (self.lora_magnitude_vector, tensors[MAGNITUDE].reshape(-1))]

    @classmethod
    def expected_shapes(cls, kind: LayerKind, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
        magnitude = kind.magnitude_to_file(torch.empty(kind.out_features, device=torch.device("meta")))
        return {**super().expected_shapes(kind, config, path), MAGNITUDE: tuple(magnitude.shape)}

    @classmethod
    def peft_config_fields(
        cls, config: AdapterConfig, modules: Mapping[str, AdapterMethod], per_module: PerModule
    ) -> dict[str, Any]:
        return {**super().peft_config_fields(config, modules, per_module), "use_dora": True}

    def init_magnitude(self, base_layer: nn.Module) -> None:
        """m = ||W + s·BA|| per output row, so the layer is unchanged at initialisation."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm(base_layer))

    def fused_update(self, base_layer: nn.Module) -> FusedUpdate | None:
        """LoRA's update with the output scale c = m / ||W + s·B A||: the one-node path computes
        c ⊙ (W x + s·B A x) + (1 − c) ⊙ bias as :meth:`forward` does, the norm a constant there too,
        and keeps the same tensors (x, x Aᵀ and the output before c, which m's gradient needs)."""
        p = self.fused_dropout()
        if type(self).forward is not DoRA.forward or p is None or self.offset_A.shape[0]:
            return None
        scale = self.lora_magnitude_vector / self.weight_norm(base_layer)
        return FusedUpdate(self.lora_A, self.lora_B, self.scaling, output_scale=scale, dropout=p)

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, *, inplace: bool = False
    ) -> torch.Tensor:
        kind = self.kind
        scale = kind.channel((self.lora_magnitude_vector / self.weight_norm(base_layer)).to(base_out.dtype))
        z = self.add_update_(x, base_out if inplace else base_out.clone())  # W x + bias + s·B A x
        # (m/n) ⊙ (z − bias) + bias = (m/n) ⊙ z + (1 − m/n) ⊙ bias: the bias term is one vector,
        # so no pass over the output subtracts the bias.
        bias = kind.bias(base_layer)
        if torch.is_grad_enabled():  # m's gradient needs z: the result is a new tensor
            return z * scale if bias is None else torch.addcmul((1 - scale) * bias, z, scale)
        z.mul_(scale)
        return z if bias is None else z.add_((1 - scale) * bias)

    @torch.no_grad()
    def weight_norm(self, base_layer: nn.Module) -> torch.Tensor:
        """||W + s·BA|| per output row in float32, detached (a constant in backward)."""
        W = self.kind.weight_matrix(base_layer)
        # A quantised base dequantises W afresh on every call; made under inference_mode, that copy
        # has no version counter, and there is nothing to cache against anyway.
        key = None if W.is_inference() or not self.reuse_norm_by_version else (
            W.data_ptr(), W._version, self.lora_A._version, self.lora_B._version, self.scaling)
        if key is not None and key == self._norm_key and self._norm is not None and self._norm.device == W.device:
            return self._norm
        A, B, s = self.lora_A.float(), self.lora_B.float(), self.scaling
        WAt = (W @ A.t().to(W.dtype)).float()  # (out, r)
        # ||W_i||² + s·Σ_k B_ik (2·(W Aᵀ)_ik + s·(B A Aᵀ)_ik), in few small ops
        T = torch.addmm(WAt, B, A @ A.t(), beta=2.0, alpha=s)
        sq = torch.add(self._row_sq_norms(W), (B * T).sum(1), alpha=s)
        self._norm = sq.clamp_min_(0).sqrt_().clamp_min_(torch.finfo(torch.float32).tiny)
        self._norm_key = key
        return self._norm

    def _row_sq_norms(self, W: torch.Tensor) -> torch.Tensor:
        key = None if W.is_inference() else (W.data_ptr(), W._version, W.device)
        if key is None or key != self._w_sq_key or self._w_sq is None:
            self._w_sq = W.float().pow(2).sum(1) if W.dtype != torch.float32 else W.pow(2).sum(1)
            self._w_sq_key = key
        return self._w_sq

    def merged_weight(self, W: torch.Tensor, forward_base: torch.Tensor | None = None) -> torch.Tensor:
        # The unmerged forward scales the running output (base plus any adapters applied before
        # this one) by m / ||W_base + s·B A||, W_base being the weight the base layer holds. Merging
        # must use that same norm, not the norm of W with earlier adapters of this merge added in.
        delta = self.delta_weight()
        combined = W + delta
        seen = combined if forward_base is None or forward_base is W else forward_base + delta
        norm = seen.norm(dim=1)
        self._merged_norm = norm
        return combined * (self.lora_magnitude_vector.detach().float() / norm).unsqueeze(1)

    def unmerged_weight(self, W_merged: torch.Tensor) -> torch.Tensor:
        if self._merged_norm is None:
            raise RuntimeError("DoRA unmerge needs the norm recorded at merge time; merge first")
        ratio = (self._merged_norm / self.lora_magnitude_vector.detach().float()).unsqueeze(1)
        self._merged_norm = None
        return W_merged * ratio - self.delta_weight()
