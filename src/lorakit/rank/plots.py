"""The two pictures of a rank measurement: spectra per module type, and effective rank per layer.

``spectra.png``: one panel per module type (``attention.self.query``, ``mlp.down_proj``, ...),
one line per layer, σᵢ/σ₁ on a log scale, so how fast the spectra fall (how few directions
matter) is compared across layers at a glance whatever their scales.
``effective_rank.png``: a heatmap of layer × module type, the effective rank at 95% energy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from lorakit.rank.spectra import Spectrum
from lorakit.rank.suggest import split_path

HEATMAP_ENERGY = 0.95


def by_type(spectra: Mapping[str, Spectrum]) -> dict[str, dict[int | None, Spectrum]]:
    """Module type → layer index → spectrum (None: a module outside the numbered blocks)."""
    grouped: dict[str, dict[int | None, Spectrum]] = {}
    for path, spectrum in spectra.items():
        layer, kind = split_path(path)
        grouped.setdefault(kind, {})[layer] = spectrum
    return grouped


def plot_spectra(spectra: Mapping[str, Spectrum], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = by_type(spectra)
    columns = min(3, len(grouped))
    rows = math.ceil(len(grouped) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    colours = plt.get_cmap("viridis")
    for ax, (kind, layers) in zip(axes.flat, grouped.items(), strict=False):
        indexed = sorted(layers, key=lambda layer: -1 if layer is None else layer)
        for i, layer in enumerate(indexed):
            values = [max(v, 1e-12) for v in layers[layer].normalised()]
            ax.plot(range(1, len(values) + 1), values, color=colours(i / max(1, len(indexed) - 1)), linewidth=1,
                    label="—" if layer is None else f"layer {layer}")
        ax.set_yscale("log")
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("i")
        ax.set_ylabel("σᵢ / σ₁")
        ax.grid(True, alpha=0.3)
        if len(indexed) <= 12:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(grouped):]:
        ax.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_effective_rank(spectra: Mapping[str, Spectrum], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grouped = {kind: layers for kind, layers in by_type(spectra).items() if any(k is not None for k in layers)}
    if not grouped:  # no numbered blocks: one row
        grouped = {kind: {0: next(iter(layers.values()))} for kind, layers in by_type(spectra).items()}
    kinds = list(grouped)
    layers = sorted({layer for found in grouped.values() for layer in found if layer is not None})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for j, kind in enumerate(kinds):
        for i, layer in enumerate(layers):
            spectrum = grouped[kind].get(layer)
            if spectrum is not None:
                rank = spectrum.effective_rank(HEATMAP_ENERGY)
                grid[i, j] = len(spectrum.values) + 1 if rank is None else rank
    figure, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2.5, 0.45 * len(layers) + 2))
    image = ax.imshow(grid, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_ylabel("layer")
    for i in range(len(layers)):
        for j in range(len(kinds)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] > np.nanmean(grid) else "black")
    figure.colorbar(image, ax=ax, label=f"effective rank at {HEATMAP_ENERGY:.0%} energy")
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
