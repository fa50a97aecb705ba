"""Bootstrap confidence intervals for per-example metrics, paired so differences are honest.

An evaluation set of a few hundred examples gives accuracies that move by several points from
sample to sample; a number without its interval invites reading noise as progress. Every
interval here resamples examples (not tokens) with one fixed generator, and a difference
between two models resamples the same examples for both (a paired bootstrap), which is far
tighter than comparing two separate intervals.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LEVEL = 0.95


def resample_indices(n: int, resamples: int, seed: int = 0) -> torch.Tensor:
    """(resamples, n) example indices drawn with replacement."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (resamples, n), generator=generator)


def interval(samples: torch.Tensor, level: float = LEVEL) -> list[float]:
    """The percentile interval of bootstrap statistics."""
    low, high = torch.quantile(samples.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return [low.item(), high.item()]


Statistic = Callable[[torch.Tensor], torch.Tensor]  # (resamples, n) indices -> (resamples,) values


def mean_of(values: torch.Tensor) -> Statistic:
    values = values.double()
    return lambda idx: values[idx].mean(dim=-1)


def ratio_of(sums: torch.Tensor, counts: torch.Tensor) -> Statistic:
    """Token-weighted means (per-token loss): summed numerators over summed denominators."""
    sums, counts = sums.double(), counts.double()
    return lambda idx: sums[idx].sum(dim=-1) / counts[idx].sum(dim=-1).clamp_min(1)


def macro_f1_of(predicted: torch.Tensor, truth: torch.Tensor, num_labels: int) -> Statistic:
    """Macro-averaged F1 over the labels present in the (resampled) truth or predictions."""
    codes = truth.long() * num_labels + predicted.long()

    def statistic(idx: torch.Tensor) -> torch.Tensor:
        squeeze = idx.dim() == 1
        idx = idx.unsqueeze(0) if squeeze else idx
        rows = idx.shape[0]
        offsets = torch.arange(rows).unsqueeze(1) * num_labels * num_labels
        counts = torch.bincount((codes[idx] + offsets).flatten(), minlength=rows * num_labels * num_labels)
        confusion = counts.view(rows, num_labels, num_labels).double()  # [truth, predicted]
        hits = confusion.diagonal(dim1=1, dim2=2)
        support, claimed = confusion.sum(2), confusion.sum(1)
        f1 = 2 * hits / (support + claimed).clamp_min(1)
        present = (support + claimed) > 0
        value = (f1 * present).sum(1) / present.sum(1).clamp_min(1)
        return value[0] if squeeze else value

    return statistic


def estimate(statistic: Statistic, n: int, resamples: int, seed: int = 0) -> dict[str, float | list[float]]:
    """The statistic on the whole set and its bootstrap interval."""
    whole = statistic(torch.arange(n)).item()
    return {"value": whole, "ci": interval(statistic(resample_indices(n, resamples, seed)))}


def paired(base: Statistic, adapted: Statistic, n: int, resamples: int, seed: int = 0) -> dict[str, object]:
    """Base, adapted and their difference (adapted − base) with intervals from the same resamples."""
    idx = resample_indices(n, resamples, seed)
    everything = torch.arange(n)
    b, a = base(idx), adapted(idx)
    whole_b, whole_a = base(everything).item(), adapted(everything).item()
    return {
        "base": whole_b, "adapted": whole_a, "difference": whole_a - whole_b,
        "base_ci": interval(b), "adapted_ci": interval(a), "difference_ci": interval(a - b),
        "level": LEVEL, "resamples": resamples,
    }
