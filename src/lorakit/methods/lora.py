"""LoRA (Hu et al. 2021, arXiv:2106.09685) and LoRA-FA (Zhang et al. 2023, arXiv:2308.03303).

    h = W x + s · B A x,   A (r, in), B (out, r), s = alpha / r  (alpha / sqrt(r) with rsLoRA)

Two optional frozen low-rank terms describe weights that moved away from the original base,
so that nothing lorakit does leaves the base changed for other adapters loaded after it:

- ``offset``: part of the forward. PiSSA / gradient-SVD inits subtract their initial update
  here (h = W x + s·B A x − s·B0 A0 x) instead of editing W, so the model is unchanged at
  step 0 and W stays the original.
- ``shift``: already inside the base weight in memory (Delta-LoRA moves W during training).
  It is not applied in the forward; it is added when exporting and removed on deletion.

Exported, the total change from the original base is one plain LoRA of rank r + k.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lorakit.inits import top_singular_triplets
from lorakit.kinds_base import LayerKind
from lorakit.methods.base import AdapterMethod, PerModule, filled_by_caller, values_filled_by_caller

if TYPE_CHECKING:
    from lorakit.config import AdapterConfig

# Older name of the context manager (loading a file fills every factor).
factors_filled_by_caller = values_filled_by_caller


class LoRA(AdapterMethod):
    method_name = "lora"
    title = "LoRA"
    peft_type = "LORA"
    trainable = ("lora_A", "lora_B")
    up_tensors = ("lora_B",)
    inits = ("default", "gaussian", "pissa", "gradient-svd")
    peft_config_keys: ClassVar[frozenset[str]] = frozenset({
        "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "lora_dropout",
        "exclude_modules"})

    def __init__(self, kind: LayerKind, rank: int, scaling: float, dropout: float) -> None:
        super().__init__(kind, rank, scaling, dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, kind.in_features))
        filled = filled_by_caller()
        self.lora_B = nn.Parameter((torch.empty if filled else torch.zeros)(kind.out_features, rank))
        if not filled:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # Frozen terms; empty (rank 0) unless an init or a training rule sets them.
        self.register_buffer("offset_A", torch.zeros(0, kind.in_features))
        self.register_buffer("offset_B", torch.zeros(kind.out_features, 0))
        self.register_buffer("shift_A", torch.zeros(0, kind.in_features))
        self.register_buffer("shift_B", torch.zeros(kind.out_features, 0))

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, *, inplace: bool = False
    ) -> torch.Tensor:
        return self.add_update_(x, base_out if inplace else base_out.clone())

    def add_update_(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out += s · B A x (plus the frozen offset) in place: one GEMM accumulating into ``out``.

        The scaling rides on the GEMM's alpha rather than on a scaled copy of B.
        """
        kind = self.kind
        x = self.dropout(x)
        if self.offset_A.shape[0] == 0:
            return kind.add_up_(out, kind.down(x, self.lora_A), self.lora_B, self.scaling)
        A, B = self.factors()
        return kind.add_up_(out, kind.down(x, A), B)

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if type(self).forward is not LoRA.forward:
            return None  # DoRA (its own forward) hands its own fused_update
        if self.offset_A.shape[0] == 0:
            return self.lora_A, self.lora_B, self.scaling
        A, B = self.factors()
        return A, B, 1.0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.lora_B * self.scaling
        if self.offset_A.shape[0] == 0:
            return self.lora_A, B
        return torch.cat([self.lora_A, self.offset_A]), torch.cat([B, self.offset_B], dim=1)

    def exported_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of the whole change from the original base weight (offset and shift included)."""
        A, B = self.factors()
        if self.shift_A.shape[0] == 0:
            return A.detach(), B.detach()
        r = self.lora_A.shape[0]
        if self.offset_A.shape[0] == 0 and torch.equal(self.shift_A[:r], self.lora_A):
            # Delta-LoRA's shift c·s·(B_T A_T − B_K A_K) was recorded with the current A, so
            # s·B A + shift = [s·B + c·s·B_T | −c·s·B_K] [A; A_K]: rank 2r, not 3r.
            B_out = torch.cat([B + self.shift_B[:, :r], self.shift_B[:, r:]], dim=1)
            return self.shift_A.detach().clone(), B_out.detach()
        return torch.cat([A, self.shift_A]).detach(), torch.cat([B, self.shift_B], dim=1).detach()

    def weight_shift(self) -> torch.Tensor | None:
        if self.shift_A.shape[0] == 0:
            return None
        return self.shift_B.float() @ self.shift_A.float()

    def load_restores_all(self) -> bool:
        return self.offset_A.shape[0] == 0 and self.shift_A.shape[0] == 0  # a load starts without them

    def set_offset(self, A0: torch.Tensor, B0_scaled: torch.Tensor) -> None:
        """Make the forward subtract B0_scaled @ A0 (the initial update), keeping W untouched."""
        self.offset_A = A0.detach().to(self.lora_A).clone()
        self.offset_B = (-B0_scaled).detach().to(self.lora_A).clone()

    @torch.no_grad()
    def set_update(self, A: torch.Tensor, B_scaled: torch.Tensor) -> None:
        """Make this adapter's update exactly B_scaled @ A (a combination of adapters)."""
        self.lora_A.copy_(A)
        self.lora_B.copy_(B_scaled / self.scaling)

    def take_combination(self, A: torch.Tensor, B_scaled: torch.Tensor,
                         inputs: list[tuple[AdapterMethod, float]]) -> None:
        self.set_update(A, B_scaled)

    # -- inits ---------------------------------------------------------------------------------
    @torch.no_grad()
    def initialise(self, init: str, base_layer: nn.Module, gradient: torch.Tensor | None) -> None:
        if init == "gaussian":  # A ~ N(0, 1/r²) as PEFT does, B = 0
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
            self.lora_B.zero_()
        elif init == "pissa":
            self._init_pissa(self.kind.weight_matrix(base_layer))
        elif init == "gradient-svd":
            assert gradient is not None
            self._init_from_gradient(gradient)
        else:
            super().initialise(init, base_layer, gradient)

    def _init_pissa(self, W: torch.Tensor) -> None:
        """s·B A = U_r S_r V_rᵀ (the principal part of W); the forward subtracts it at step 0."""
        U, S, Vh = top_singular_triplets(W.float(), self.rank)
        root = S.sqrt()
        self.lora_A.copy_(root.unsqueeze(1) * Vh)
        self.lora_B.copy_(U * root / self.scaling)
        self.set_offset(self.lora_A, self.lora_B * self.scaling)

    def _init_from_gradient(self, grad: torch.Tensor) -> None:
        """A = √(S/S₁)·Vᵀ_r, B = U_r·√(S/S₁) from the top singular triplets of −dL/dW.

        The factors span the subspaces the truncated gradient lives in, so the first steps move W
        along it (a random A only sees a random r-dimensional slice of it). Taking the SVD of the
        descent direction −G rather than G matters: the initial product B A then has the sign the
        update needs, so training grows it instead of dragging it through the saddle at B A = 0.
        """
        U, S, Vh = top_singular_triplets(-grad.float(), self.rank)
        weights = (S / S[0].clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
        self.lora_A.copy_(weights.unsqueeze(1) * Vh)
        self.lora_B.copy_(U * weights)
        self.set_offset(self.lora_A, self.lora_B * self.scaling)

    # -- files: PEFT's plain LoRA --------------------------------------------------------------
    def _file_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as PEFT stores them: offsets and shifts exported as extra rank, s unchanged."""
        if self.load_restores_all():
            return self.lora_A, self.lora_B
        A, B_scaled = self.exported_factors()
        return A, B_scaled / self.scaling

    def _file_rank_alpha(self, config: AdapterConfig, path: str) -> tuple[int, float]:
        """The rank and alpha PEFT reads for this module: its own, or, for an exported rank r + k,
        the alpha that keeps s unchanged."""
        if self.load_restores_all():
            return config.rank_for(path), config.alpha_for(path)
        r_total = self._file_factors()[0].shape[0]
        return r_total, self.scaling * (math.sqrt(r_total) if config.use_rslora else r_total)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        A, B = self._file_factors()
        kind = self.kind
        return {kind.peft_a_key: kind.a_to_file(A), kind.peft_b_key: kind.b_to_file(B)}

    def file_copies(self, tensors: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        kind = self.kind
        return [(self.lora_A, kind.a_from_file(tensors[kind.peft_a_key])),
                (self.lora_B, kind.b_from_file(tensors[kind.peft_b_key]))]

    @classmethod
    def expected_shapes(cls, kind: LayerKind, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
        r, meta = config.rank_for(path), torch.device("meta")
        return {
            kind.peft_a_key: tuple(kind.a_to_file(torch.empty(r, kind.in_features, device=meta)).shape),
            kind.peft_b_key: tuple(kind.b_to_file(torch.empty(kind.out_features, r, device=meta)).shape),
        }

    @classmethod
    def peft_config_fields(
        cls, config: AdapterConfig, modules: Mapping[str, AdapterMethod], per_module: PerModule
    ) -> dict[str, Any]:
        facts = {path: m._file_rank_alpha(config, path) for path, m in modules.items()}
        r, rank_pattern = per_module({p: rank for p, (rank, _) in facts.items()})
        alpha, alpha_pattern = per_module({p: alpha for p, (_, alpha) in facts.items()})
        return {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                "use_rslora": config.use_rslora, "use_dora": False, "lora_dropout": config.dropout,
                "init_lora_weights": True, "exclude_modules": None}

    @classmethod
    def config_from_peft(cls, data: Mapping[str, Any], source: str) -> dict[str, Any]:
        return {
            "method": "dora" if data.get("use_dora") else "lora",
            "alpha": float(data.get("lora_alpha", 8)),
            "dropout": float(data.get("lora_dropout", 0.0)),
            "use_rslora": bool(data.get("use_rslora", False)),
            "rank_pattern": {k: int(v) for k, v in (data.get("rank_pattern") or {}).items()},
            "alpha_pattern": {k: float(v) for k, v in (data.get("alpha_pattern") or {}).items()},
            "exclude_modules": _optional_tuple_or_str(data.get("exclude_modules")),
        }


def _optional_tuple_or_str(value: Any) -> tuple | str | None:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


class LoRAFA(LoRA):
    """LoRA-FA: A is frozen after initialisation, only B trains (halves activation memory for A)."""

    method_name = "lora-fa"
    title = "LoRA-FA"
    trainable = ("lora_B",)

    def __init__(self, kind: LayerKind, rank: int, scaling: float, dropout: float) -> None:
        super().__init__(kind, rank, scaling, dropout)
        self.lora_A.requires_grad_(False)
