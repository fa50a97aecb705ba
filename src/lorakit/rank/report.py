"""Per-module figures as JSON values and as the printed table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorakit.rank.spectra import ENERGIES, Spectrum


def module_figures(spectrum: Spectrum, total_energy: float, top: int) -> dict[str, Any]:
    """One module's figures: the top singular values, effective ranks, stable rank, and its
    share of the energy (Σσ² = ‖M‖F²) of all measured modules together."""
    return {
        "out_features": spectrum.out_features,
        "in_features": spectrum.in_features,
        "singular_values": [float(f"{v:.6g}") for v in spectrum.values[:top]],
        "spectrum_complete": spectrum.complete,
        "energy": spectrum.energy,
        "effective_rank": {f"{share:g}": spectrum.effective_rank(share) for share in ENERGIES},
        "stable_rank": round(spectrum.stable_rank, 4),
        "share": spectrum.energy / total_energy if total_energy > 0 else 0.0,
    }


def _rank_text(value: int | None, spectrum: Spectrum) -> str:
    return f">{len(spectrum.values)}" if value is None else str(value)


def table(spectra: Mapping[str, Spectrum], last: Mapping[str, str], last_title: str,
          extra: Mapping[str, str] | None = None, extra_title: str = "") -> str:
    """A fixed-width table: module, shape, σ₁, effective ranks, stable rank, share, then the
    caller's columns (``extra``, ``last``)."""
    total = sum(s.energy for s in spectra.values())
    header = ["module", "out×in", "σ₁", "r90", "r95", "r99", "stable", "share"]
    if extra is not None:
        header.append(extra_title)
    header.append(last_title)
    rows = [header]
    for path, s in spectra.items():
        row = [path, f"{s.out_features}×{s.in_features}", f"{s.values[0]:.3g}" if s.values else "0",
               *(_rank_text(s.effective_rank(share), s) for share in ENERGIES), f"{s.stable_rank:.1f}",
               f"{100 * s.energy / total:.1f}%" if total > 0 else "0%"]
        if extra is not None:
            row.append(extra[path])
        row.append(last[path])
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:],
                                                                                       strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
