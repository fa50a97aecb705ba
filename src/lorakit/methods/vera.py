"""VeRA (Kopiczko et al. 2024, arXiv:2310.11454): vector-based random matrix adaptation.

    h = W x + b ⊙ (B (d ⊙ (A x)))

A (r, in_max) and B (out_max, r) are frozen random matrices generated once from a seed and
shared by every adapted layer of the model (each layer uses the top-left slice it needs). Only
the vectors d (r, starts at a small constant) and b (out, starts at 0) train. VeRA is therefore
LoRA-shaped: its update is exactly (b ⊙ B) (d ⊙ A).

Its options (``AdapterConfig(method="vera", options={...})``): ``projection_seed`` (PEFT's
``projection_prng_key``) and ``d_initial``. The projections are the adapter's shared state, saved
once per file as PEFT does (``base_model.vera_A`` / ``vera_B``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lorakit.errors import AdapterFileError
from lorakit.fused import FusedUpdate
from lorakit.kinds_base import LayerKind
from lorakit.methods.base import AdapterMethod, PerModule

if TYPE_CHECKING:
    from lorakit.config import AdapterConfig


@dataclass(frozen=True)
class VeraOptions:
    projection_seed: int = 0  # seed of the shared frozen projections (PEFT: projection_prng_key)
    d_initial: float = 0.1  # d starts here; b starts at 0

    def __post_init__(self) -> None:
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int):
            raise ValueError(f"projection_seed must be an integer, got {self.projection_seed!r}")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) \
                or not math.isfinite(self.d_initial):
            raise ValueError(f"d_initial must be a finite number, got {self.d_initial!r}")
        object.__setattr__(self, "d_initial", float(self.d_initial))


class VeraProjections(nn.Module):
    """The shared frozen pair, one module referenced by every VeRA layer of an adapter.

    Buffers are non-persistent: the projections are saved once per adapter, not per layer.
    """

    def __init__(self, rank: int, in_max: int, out_max: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        A = torch.empty(rank, in_max)
        B = torch.empty(out_max, rank)
        _kaiming_uniform(A, generator)
        _kaiming_uniform(B, generator)
        self.register_buffer("vera_A", A, persistent=False)
        self.register_buffer("vera_B", B, persistent=False)


def _kaiming_uniform(tensor: torch.Tensor, generator: torch.Generator) -> None:
    bound = 1.0 / math.sqrt(tensor.shape[1])  # kaiming_uniform with a = sqrt(5)
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


class VeRA(AdapterMethod):
    method_name = "vera"
    title = "VeRA"
    peft_type = "VERA"
    trainable = ("vera_lambda_d", "vera_lambda_b")
    up_tensors = ("vera_lambda_b",)
    Options = VeraOptions
    peft_config_keys: ClassVar[frozenset[str]] = frozenset(
        {"r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial"})

    def __init__(
        self, kind: LayerKind, rank: int, scaling: float, dropout: float,
        projections: VeraProjections, d_initial: float,
    ) -> None:
        super().__init__(kind, rank, 1.0, dropout)
        if projections.vera_A.shape[1] < kind.in_features or projections.vera_B.shape[0] < kind.out_features:
            raise ValueError("VeRA projections are smaller than the layer they must cover")
        self.projections = projections
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), float(d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(kind.out_features))

    @classmethod
    def scaling_for(cls, config: AdapterConfig, path: str) -> float:
        return 1.0  # the trained vectors carry the scale

    @classmethod
    def shared_state(cls, config: AdapterConfig, kinds: Sequence[LayerKind]) -> VeraProjections:
        in_max, out_max = max(k.in_features for k in kinds), max(k.out_features for k in kinds)
        return VeraProjections(config.r, in_max, out_max, config.options.projection_seed)

    @classmethod
    def create(cls, kind: LayerKind, config: AdapterConfig, path: str, shared: nn.Module | None) -> VeRA:
        assert isinstance(shared, VeraProjections)
        return cls(kind, config.r, 1.0, config.dropout, shared, config.options.d_initial)

    def projection_slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts of the shared projections this layer uses: A (r, in), B (out, r), views."""
        return self.projections.vera_A[:, : self.kind.in_features], self.projections.vera_B[: self.kind.out_features, :]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.projection_slices()
        return self.vera_lambda_d.unsqueeze(1) * A, self.vera_lambda_b.unsqueeze(1) * B

    def fused_update(self, base_layer: nn.Module) -> FusedUpdate | None:
        """The frozen projections and the two vectors apart: the node folds d and b into weight-sized
        copies once per call, and since A is frozen it keeps x Aᵀ (tokens × r) for d's gradient
        instead of x, and forms no (r, in) gradient at all."""
        p = self.fused_dropout()
        if type(self).forward is not AdapterMethod.forward or p is None:
            return None
        A, B = self.projection_slices()
        return FusedUpdate(A, B, 1.0, d=self.vera_lambda_d, b=self.vera_lambda_b, dropout=p)

    # -- files: PEFT's VeRA ----------------------------------------------------------------------
    # file_tensors / file_copies: the defaults (vera_lambda_b, vera_lambda_d under their own names)
    @classmethod
    def expected_shapes(cls, kind: LayerKind, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
        return {"vera_lambda_b": (kind.out_features,), "vera_lambda_d": (config.r,)}

    @classmethod
    def shared_file_tensors(cls, shared: nn.Module | None) -> dict[str, torch.Tensor]:
        assert isinstance(shared, VeraProjections)
        return {"vera_A": shared.vera_A, "vera_B": shared.vera_B}

    @classmethod
    def expected_shared_shapes(cls, config: AdapterConfig, kinds: Sequence[LayerKind]) -> dict[str, tuple[int, ...]]:
        return {"vera_A": (config.r, max(k.in_features for k in kinds)),
                "vera_B": (max(k.out_features for k in kinds), config.r)}

    @classmethod
    def peft_config_fields(
        cls, config: AdapterConfig, modules: Mapping[str, AdapterMethod], per_module: PerModule
    ) -> dict[str, Any]:
        options = config.options
        return {"r": config.r, "projection_prng_key": options.projection_seed, "save_projection": True,
                "vera_dropout": config.dropout, "d_initial": options.d_initial, "init_weights": True}

    @classmethod
    def config_from_peft(cls, data: Mapping[str, Any], source: str) -> dict[str, Any]:
        if not data.get("save_projection", True):
            raise AdapterFileError(
                f"{source}: the VeRA projections were not saved (save_projection=false); "
                "re-save the adapter with save_projection=True"
            )
        return {"method": "vera", "dropout": float(data.get("vera_dropout", 0.0)),
                "options": {"projection_seed": int(data.get("projection_prng_key", 0)),
                            "d_initial": float(data.get("d_initial", 0.1))}}
