"""GPart (Mandica et al. 2026, arXiv:2605.14841): one isometric partition matrix maps a trained vector into W.

    ΔW = scale · reshape(P θ),   θ ∈ R^d trained,   P (out·in, d) fixed,   PᵀP = I

There is no A/B factorisation. Only the abstract could be read, so the construction below is
lorakit's reading of "a single isometric partition matrix maps a trainable vector θ into the
full weight space" (PEFT's Uni-LoRA builds the same kind of matrix for its LoRA factors):

- the entries of the layer's (out, in) matrix (the linear convention; numbered row-major) are
  split into d balanced groups: group g holds n_g entries, and the n_g differ by at most one;
- P's column g is 1/√n_g on the entries of group g and 0 elsewhere, so its columns are
  orthonormal (PᵀP = I) and ‖ΔW‖_F = scale·‖θ‖: the map preserves distances, which LoRA's
  bilinear B A does not;
- θ starts at 0: the model is unchanged, and since ΔW is linear in θ its gradient
  Pᵀ vec(∂L/∂ΔW) is not zero.

Choices of lorakit's reading:

- **One θ per adapted layer**, as in PEFT's tuners. The abstract's "single" matrix may span
  every layer with one model-wide θ; lorakit trains, freezes, saves and hot-swaps each layer's
  own tensors, and an adapter's shared state holds frozen tensors only, so a model-wide θ would
  need the protocol extended. The maps are shared: layers of the same shape, d and seed use the
  same map, kept once per adapter in the shared state (:class:`GPartPartitions`).
- **d per layer**: option ``d``, or by default r·(in + out), the trainable parameters of LoRA
  of rank r on that layer (``rank_pattern`` applies), so GPart and LoRA compare at equal budgets
  with the same ``r``. A layer with fewer than d entries gets d = out·in: each entry its own
  group, which is full fine-tuning of that layer.
- **No alpha / r scaling** (there is no rank to compensate): ``scale`` (default 1) multiplies
  ΔW. With Adam it acts as a learning-rate multiplier for θ alone, for a recipe shared with
  other methods; ``alpha`` and ``use_rslora`` are not used.
- **The partition is a pure function of (out, in, d, seed)**, computed with 32-bit integer
  arithmetic rather than torch's random generators: entry j gets the key lowbias32(j XOR
  lowbias32(seed)) (a bijection of 32-bit integers, so keys are distinct), entries are sorted by
  key, and the entry at position p joins group p mod d. A file stores θ and the seed only (in
  its options); the map is rebuilt on load and is the same on any torch version and device.

Costs. The map is an int32 tensor of out·in entries per distinct layer shape (half of an fp32
copy of that weight), built once in O(out·in·log) on the CPU. The forward forms ΔW (out, in) by
one gather, ΔW = (scale · θ / √n)[map], and runs x ΔWᵀ: as much compute as the base layer, and
training keeps ΔW for backward and runs an (out, in) weight-gradient GEMM, as full fine-tuning
of the layer does (without its optimizer state: only θ trains). For serving, merge it.

Capabilities: mergeable (merged W = W + ΔW, unmerged W − ΔW). Not mixable: ΔW is not a low-rank
product, so in mixed batches its rows run through its own forward. Not combinable: combining
writes low-rank factors, and ΔW has full rank (exact factors would be as large as W itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.kinds_base import LayerKind
from lorakit.methods.base import AdapterMethod

if TYPE_CHECKING:
    from lorakit.config import AdapterConfig

THETA = "gpart_theta"
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class GPartOptions:
    d: int | None = None  # θ's length per layer; None: r·(in + out), LoRA rank r's parameters on that layer
    seed: int = 0  # the partition's seed (0 ≤ seed < 2³²); the file keeps it, never the map
    scale: float = 1.0  # ΔW = scale · P θ

    def __post_init__(self) -> None:
        if self.d is not None and (isinstance(self.d, bool) or not isinstance(self.d, int)
                                   or not 0 < self.d < 2**31):
            raise ValueError(f"d must be a positive integer below 2³¹ (or None for r·(in + out)), got {self.d!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= _MASK32:
            raise ValueError(f"seed must be an integer from 0 to {_MASK32}, got {self.seed!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"scale must be a finite non-zero number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))


# -- the partition ---------------------------------------------------------------------------------
def _mul32(x, c: int):
    """(x · c) mod 2³² for 0 ≤ x < 2³² without leaving int64: c split into 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x):
    """lowbias32 (C. Wellons' integer hash): a bijection of 32-bit integers with strong avalanche.
    Works on Python ints and on int64 tensors alike, with the same result."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def partition(out_features: int, in_features: int, d: int, seed: int) -> torch.Tensor:
    """Each entry's group (int32, out·in, row-major over the (out, in) matrix), balanced: group g
    has ⌈(out·in − g) / d⌉ entries. A pure function of its arguments (see the module docstring)."""
    n = out_features * in_features
    if n > _MASK32:
        raise ConfigError(f"GPart numbers a layer's entries in 32 bits; a layer of {out_features}×{in_features} "
                          "has too many: leave it out of target_modules")
    if not 0 < d <= n:
        raise ValueError(f"d={d} must be between 1 and the layer's {n} entries")
    keys = mix32(torch.arange(n, dtype=torch.int64) ^ mix32(seed))
    order = torch.sort(keys, stable=True).indices  # keys are distinct; stable only for certainty
    del keys
    groups = torch.empty(n, dtype=torch.int32)
    groups[order] = (torch.arange(n, dtype=torch.int64) % d).to(torch.int32)
    return groups


def group_sizes(n: int, d: int) -> torch.Tensor:
    """n_g of :func:`partition`'s groups: n // d, plus one for the first n mod d groups."""
    return n // d + (torch.arange(d) < n % d).to(torch.int64)


class GPartPartitions(nn.Module):
    """One adapter's partitions, by (out, in, d): built on first use, shared by every layer that
    needs the same one. Non-persistent buffers: files hold the seed, never a map."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def get(self, out_features: int, in_features: int, d: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(each entry's group, 1/√n_g per group) on ``device``."""
        name = f"groups_{out_features}x{in_features}_d{d}"
        if name not in self._buffers:
            n = out_features * in_features
            self.register_buffer(name, partition(out_features, in_features, d, self.seed).to(device),
                                 persistent=False)
            self.register_buffer(name + "_rsqrt", group_sizes(n, d).double().rsqrt().float().to(device),
                                 persistent=False)
        groups, rsqrt = self._buffers[name], self._buffers[name + "_rsqrt"]
        if groups.device != device:  # a model spread over devices: a copy per device, not kept
            groups, rsqrt = groups.to(device), rsqrt.to(device)
        return groups, rsqrt

    def extra_repr(self) -> str:
        return f"seed={self.seed}, maps={sum(1 for n in self._buffers if not n.endswith('_rsqrt'))}"


# -- the method ------------------------------------------------------------------------------------
class GPart(AdapterMethod):
    method_name = "gpart"
    title = "GPart"
    peft_type = None  # saved as LORAKIT_GPART
    mergeable = True
    mixable = False
    combinable = False
    trainable = (THETA,)
    Options = GPartOptions

    def __init__(self, kind: LayerKind, rank: int, scaling: float, dropout: float, d: int,
                 partitions: GPartPartitions) -> None:
        super().__init__(kind, rank, scaling, dropout)
        self.d = d
        self.partitions = partitions
        self.gpart_theta = nn.Parameter(torch.zeros(d))

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def length(cls, kind: LayerKind, config: AdapterConfig, path: str) -> int:
        """θ's length on the module at ``path``: ``d`` or r·(in + out), at most the layer's entries."""
        d = config.options.d
        if d is None:
            d = config.rank_for(path) * (kind.in_features + kind.out_features)
        return min(d, kind.in_features * kind.out_features)

    @classmethod
    def scaling_for(cls, config: AdapterConfig, path: str) -> float:
        return config.options.scale

    @classmethod
    def shared_state(cls, config: AdapterConfig, kinds: Sequence[LayerKind]) -> GPartPartitions:
        return GPartPartitions(config.options.seed)

    @classmethod
    def create(cls, kind: LayerKind, config: AdapterConfig, path: str, shared: nn.Module | None) -> GPart:
        partitions = shared if isinstance(shared, GPartPartitions) else GPartPartitions(config.options.seed)
        return cls(kind, config.rank_for(path), cls.scaling_for(config, path), config.dropout,
                   cls.length(kind, config, path), partitions)

    def attach(self, base_layer: nn.Module) -> None:
        if self.gpart_theta.device.type != "meta":  # build the map now, not in the first forward
            self.groups()

    # -- the update ------------------------------------------------------------------------------
    def groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.partitions.get(self.kind.out_features, self.kind.in_features, self.d, self.gpart_theta.device)

    def update_matrix(self) -> torch.Tensor:
        """ΔW = scale · reshape(P θ) as an (out, in) matrix in θ's dtype, differentiable in θ."""
        groups, rsqrt = self.groups()
        per_group = self.gpart_theta * (rsqrt.to(self.gpart_theta.dtype) * self.scaling)
        return per_group.index_select(0, groups).view(self.kind.out_features, self.kind.in_features)

    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, *, inplace: bool = False
    ) -> torch.Tensor:
        update = self.kind.down(self.dropout(x), self.update_matrix()).to(base_out.dtype)  # ΔW x, per kind
        if inplace and not (torch.is_grad_enabled() and base_out._is_view()):
            return base_out.add_(update)
        return base_out + update

    def delta_weight(self) -> torch.Tensor:
        return self.update_matrix().float()

    # -- files -----------------------------------------------------------------------------------
    # file_tensors / file_copies: the defaults (gpart_theta only: the map is a non-persistent buffer
    # of the shared state, rebuilt from the seed in the options)
    @classmethod
    def expected_shapes(cls, kind: LayerKind, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
        return {THETA: (cls.length(kind, config, path),)}

    def extra_repr(self) -> str:
        return f"d={self.d}, scale={self.scaling:g}, in={self.kind.in_features}, out={self.kind.out_features}"
