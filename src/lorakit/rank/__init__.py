"""Choosing LoRA ranks from measurements (``lorakit rank``).

Before training, the spectra of the loss gradient dL/dW on the user's data say which modules
the task pushes hardest and along how many directions (:mod:`lorakit.rank.gradients`), and a
greedy allocation turns them into targets and a ``rank_pattern`` for a parameter budget
(:mod:`lorakit.rank.suggest`). After training, the spectra of each ΔW = s·B·A say how much of
its rank an adapter used (:mod:`lorakit.rank.trained`), and an exact truncated SVD writes a
smaller adapter (:mod:`lorakit.rank.shrink`).
"""

from lorakit.rank.spectra import Spectrum, factor_spectrum, factor_svd, matrix_spectrum, truncated_factors
from lorakit.rank.suggest import allocate, captured_share, suggested_settings

__all__ = ["Spectrum", "allocate", "captured_share", "factor_spectrum", "factor_svd", "matrix_spectrum",
           "suggested_settings", "truncated_factors"]
