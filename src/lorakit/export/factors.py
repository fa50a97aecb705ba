"""Each module's update as plain-LoRA factors (A, B) with the scaling folded into B: B @ A = ΔW.

Two ways, chosen by what the method declares:

- **From its factors** (additive and combinable: LoRA, LoRA-FA, rsLoRA, SDS-LoRA, VeRA, and LoRA
  with a PiSSA / gradient-SVD offset or a Delta-LoRA shift): ``exported_factors()`` already give
  the whole change from the original base weight as B·A, so the export is exact at their rank.
  VeRA's are (b ⊙ B_shared)(d ⊙ A_shared), its vectors folded into the shared projections' slices.
  A rank or energy rule truncates them by the exact SVD of B·A through its r×r core
  (:func:`lorakit.rank.spectra.truncated_factors`), never forming an (out, in) matrix.
- **From the weight change** (any other mergeable method: DoRA, GPart): ΔW is formed per module
  in float64, as ``delta_weight()`` for an additive method and as ``merged_weight(W) − W`` for one
  that rescales W (DoRA's magnitude), plus any shift the adapter made to W in memory; its best
  rank-k approximation (Eckart–Young) is the truncated SVD, k from the rule.

A non-mergeable method (CeRA: non-linear in x) has no weight change to write and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import ConfigError
from lorakit.inits import FULL_SVD_MAX_DIM
from lorakit.layer import AdaptedLayer
from lorakit.methods import method_class
from lorakit.methods.base import AdapterMethod
from lorakit.model import AdaptedModel
from lorakit.rank.spectra import Spectrum, factor_spectrum, truncated_factors

DEFAULT_ENERGY = 0.99
# The largest --max-lora-rank every vLLM release with LoRA accepts (its first allowed 8, 16, 32, 64).
DEFAULT_MAX_RANK = 64


@dataclass(frozen=True)
class RankRule:
    """How many directions each module keeps: ``rank``, or the fewest holding ``energy`` of ΔW's
    Σσ² (at most ``max_rank``); neither: exact factors stay whole, other updates use
    ``DEFAULT_ENERGY``."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int = DEFAULT_MAX_RANK

    def __post_init__(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise ConfigError("give one of --rank and --energy, not both")
        if self.rank is not None and (isinstance(self.rank, bool) or self.rank < 1):
            raise ConfigError(f"--rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"--energy is the share of each update's energy to keep, in (0, 1]; got {self.energy}")
        if self.max_rank < 1:
            raise ConfigError(f"--max-rank must be at least 1, got {self.max_rank}")

    @property
    def given(self) -> bool:
        """Whether the user chose a rank or an energy (else exact factors are kept whole)."""
        return self.rank is not None or self.energy is not None

    def keep(self, spectrum: Spectrum, available: int) -> int:
        """The rank one module keeps, between 1 and ``available`` (an update of zero keeps one zero direction)."""
        if self.rank is not None:
            k = self.rank
        else:
            k = spectrum.effective_rank(self.energy if self.energy is not None else DEFAULT_ENERGY)
            k = min(self.max_rank if k is None else k, self.max_rank)  # None: beyond the values computed
        return max(1, min(k, available))

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank} per module"
        return f"{100 * (self.energy or DEFAULT_ENERGY):g}% of each update's energy, at most rank {self.max_rank}"


@dataclass
class ModuleExport:
    """One module's plain-LoRA factors: B @ A is the update it ships (scaling folded into B)."""

    A: torch.Tensor  # (k, in)
    B: torch.Tensor  # (out, k)
    energy_kept: float  # share of the update's Σσ² that B @ A keeps
    exact: bool  # B @ A is the update itself (up to rounding)
    source: str  # "factors", "factors, truncated" or "weight change, truncated SVD"

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def require_exportable(adapter: str, method: str) -> None:
    """A ConfigError, before anything is read or written, for a method with no weight change to export."""
    cls = method_class(method)
    if not cls.mergeable:
        raise ConfigError(f"adapter {adapter} ({cls.display_name()}) cannot be exported as a plain LoRA: "
                          f"{cls.why_not_mergeable}; serve it with `lorakit serve`, which runs every method")


def exact_from_factors(method: str) -> bool:
    """Whether a method's ``exported_factors()`` are its whole update (else ΔW is formed)."""
    cls = method_class(method)
    return cls.additive and cls.combinable


@torch.no_grad()
def plain_factors(model: AdaptedModel, name: str, rule: RankRule) -> dict[str, ModuleExport]:
    """Every module of adapter ``name`` as plain-LoRA factors under ``rule`` (the model is left as it was)."""
    model._require(name)
    method = model.configs[name].method
    require_exportable(repr(name), method)
    from_factors = exact_from_factors(method)
    exported = {}
    for path, layer in model.layers_of(name).items():
        if name in layer.merged:
            raise ConfigError(f"adapter {name!r} is merged into {path}; unmerge it before exporting")
        adapter = layer.adapters[name]
        exported[path] = _from_factors(adapter, rule) if from_factors else _from_weight_change(layer, adapter, rule)
    return exported


def _from_factors(adapter: AdapterMethod, rule: RankRule) -> ModuleExport:
    A, B = adapter.exported_factors()
    whole = ModuleExport(A.detach().clone(), B.detach().clone(), 1.0, True, "factors")
    if not rule.given:
        return whole
    spectrum = factor_spectrum(A, B)
    k = rule.keep(spectrum, A.shape[0])
    if k >= A.shape[0]:
        return whole
    A_k, B_k = truncated_factors(A, B, k)
    return ModuleExport(A_k, B_k, _kept(spectrum, k), k >= spectrum.numerical_rank, "factors, truncated")


def _from_weight_change(layer: AdaptedLayer, adapter: AdapterMethod, rule: RankRule) -> ModuleExport:
    U, S, Vh, spectrum = _svd(weight_change(layer, adapter), rule)
    k = rule.keep(spectrum, S.shape[0])
    root = S[:k].sqrt()
    return ModuleExport(root.unsqueeze(1) * Vh[:k], U[:, :k] * root, _kept(spectrum, k),
                        spectrum.complete and k >= spectrum.numerical_rank, "weight change, truncated SVD")


def weight_change(layer: AdaptedLayer, adapter: AdapterMethod) -> torch.Tensor:
    """ΔW (out, in) in float64: what the unmerged forward adds to the original base weight.

    An additive method's ``delta_weight()``; for one that rescales W (DoRA), its merged weight
    minus W; plus any change the adapter made to W in memory (``weight_shift``), which the
    original base, the one a serving engine loads, lacks.
    """
    W = layer.kind.weight_matrix(layer.base_layer).detach().double()
    delta = adapter.delta_weight().double() if adapter.additive else adapter.merged_weight(W).double() - W
    shift = adapter.weight_shift()
    return delta if shift is None else delta + shift.double()


def _svd(M: torch.Tensor, rule: RankRule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Spectrum]:
    """U, S, Vh of M (float64) and its spectrum: exact when the smaller side is at most
    ``FULL_SVD_MAX_DIM`` or the rule may keep half of it, else the top values a rule can keep by a
    randomised SVD (4 power iterations), with the exact total energy ‖M‖F²."""
    out_features, in_features = M.shape
    energy = float(M.pow(2).sum())
    cap = rule.rank if rule.rank is not None else rule.max_rank
    if min(M.shape) <= FULL_SVD_MAX_DIM or 2 * cap >= min(M.shape):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        complete = True
    else:
        U, S, V = torch.svd_lowrank(M, q=min(cap + 8, *M.shape), niter=4)
        Vh, complete = V.t(), False
    spectrum = Spectrum(tuple(float(v) for v in S), energy, out_features, in_features, complete)
    return U, S, Vh, spectrum


def _kept(spectrum: Spectrum, k: int) -> float:
    """The share of the energy the top ``k`` directions hold (1 for a zero update)."""
    if spectrum.energy <= 0.0:
        return 1.0
    return min(1.0, sum(v * v for v in spectrum.values[:k]) / spectrum.energy)
