"""What one matrix's singular values say: effective ranks, stable rank, energy.

The matrix is either a loss gradient dL/dW (before training: which directions the data pushes
W along) or a trained update ΔW = s·B·A (after training: which directions the adapter used).
Energy is the squared Frobenius norm, Σσ²; the effective rank at share p is the fewest singular
directions holding p of it, and the stable rank ‖M‖F²/‖M‖₂² is a smooth version of the same
count that no threshold decides.

A trained update is never formed as an (out, in) matrix: with B = Q_B R_B and Aᵀ = Q_A R_A
(thin QR), B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the SVD of the r×r core gives the whole spectrum and the
singular vectors, at O((out + in)·r²) cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.inits import FULL_SVD_MAX_DIM

ENERGIES = (0.90, 0.95, 0.99)  # the shares effective ranks are reported at
NUMERICAL_RANK_TOLERANCE = 1e-5  # σ below this share of σ₁ is rounding noise of a float32 matrix, not a direction


@dataclass(frozen=True)
class Spectrum:
    """The singular values of one (out, in) matrix, largest first.

    ``values`` is the whole spectrum when ``complete``; a large gradient keeps only its top
    values (randomised SVD), and ``energy`` is then still the exact Σσ² (‖M‖F²), so a share of
    energy the kept values do not reach has no effective rank to report (None: more than
    ``len(values)``).
    """

    values: tuple[float, ...]
    energy: float
    out_features: int
    in_features: int
    complete: bool = True

    def effective_rank(self, share: float) -> int | None:
        """The fewest leading singular directions holding ``share`` of the energy (0 for a zero matrix)."""
        if self.energy <= 0.0:
            return 0
        running = 0.0
        for k, value in enumerate(self.values, start=1):
            running += value * value
            if running >= share * self.energy * (1.0 - 1e-12):
                return k
        return None if not self.complete else len(self.values)

    @property
    def stable_rank(self) -> float:
        """‖M‖F² / ‖M‖₂² (0 for a zero matrix)."""
        top = self.values[0] if self.values else 0.0
        return self.energy / (top * top) if top > 0 else 0.0

    @property
    def numerical_rank(self) -> int:
        """Singular values above rounding noise (NUMERICAL_RANK_TOLERANCE × σ₁)."""
        if not self.values or self.values[0] <= 0:
            return 0
        floor = self.values[0] * NUMERICAL_RANK_TOLERANCE
        return sum(1 for v in self.values if v > floor)

    def normalised(self) -> list[float]:
        """σᵢ / σ₁ (plots compare shapes of spectra whose scales differ by orders of magnitude)."""
        top = self.values[0] if self.values and self.values[0] > 0 else 1.0
        return [v / top for v in self.values]


def matrix_spectrum(M: torch.Tensor, keep: int) -> Spectrum:
    """The spectrum of an (out, in) matrix: exact in float64 when its smaller side is at most
    ``FULL_SVD_MAX_DIM`` (the same bound gradient-SVD uses), else its top ``keep`` values by a
    randomised SVD (4 power iterations) with the exact total energy."""
    out_features, in_features = M.shape
    energy = float(M.double().pow(2).sum())
    if min(M.shape) <= FULL_SVD_MAX_DIM:
        values = torch.linalg.svdvals(M.double())
        return Spectrum(tuple(float(v) for v in values), energy, out_features, in_features)
    q = min(keep + 8, *M.shape)
    _, values, _ = torch.svd_lowrank(M.float(), q=q, niter=4)
    return Spectrum(tuple(float(v) for v in values[:keep]), energy, out_features, in_features, complete=False)


def factor_svd(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, r), S (r,), Vh (r, in) in float64 with U diag(S) Vh = B @ A, through the r×r core."""
    A, B = A.detach().double(), B.detach().double()
    Q_B, R_B = torch.linalg.qr(B)  # B (out, r) = Q_B R_B
    Q_A, R_A = torch.linalg.qr(A.t())  # Aᵀ (in, r) = Q_A R_A
    U_core, S, Vh_core = torch.linalg.svd(R_B @ R_A.t())
    return Q_B @ U_core, S, Vh_core @ Q_A.t()


def factor_spectrum(A: torch.Tensor, B: torch.Tensor) -> Spectrum:
    """The whole spectrum of B @ A, exact, without forming it."""
    _, S, _ = factor_svd(A, B)
    return Spectrum(tuple(float(v) for v in S), float(S.pow(2).sum()), B.shape[0], A.shape[1])


def truncated_factors(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_k, B_k), float64, whose product is the best rank-``rank`` approximation of B @ A
    (Eckart–Young), with √σ on both sides so neither factor dwarfs the other."""
    U, S, Vh = factor_svd(A, B)
    k = max(1, min(rank, S.shape[0]))
    root = S[:k].sqrt()
    return root.unsqueeze(1) * Vh[:k], U[:, :k] * root
