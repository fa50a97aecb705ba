"""One check for NaN / ±Inf, used before a merge writes W and before a file's tensors are used."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or ±Inf.

    ``isfinite(t).all()`` builds a bool tensor of t's size and cost more than a merge itself on a
    CPU. A float32 sum reads t once and is finite whenever every value is (NaN and Inf propagate;
    +Inf and -Inf give NaN); only when the sum is not finite (a real NaN/Inf, or an overflow of
    large finite values) does the exact test decide: min and max are NaN or ±Inf exactly when an
    entry is.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if torch.isfinite(_sum(t)):
        return True
    return _exactly_finite(t)


def first_non_finite(tensors: Sequence[torch.Tensor]) -> int | None:
    """The index of the first tensor holding NaN or ±Inf, or None when every one is finite.

    :func:`all_finite`'s rule, with one finiteness test over all the sums instead of a test (and
    a Python bool) per tensor: 448 tensors of a 7B adapter paid 5 ms for those. The tensors must
    be on one device.
    """
    candidates = [i for i, t in enumerate(tensors) if t.is_floating_point() and t.numel()]
    if not candidates:
        return None
    finite = torch.isfinite(torch.stack([_sum(tensors[i]) for i in candidates]))
    if bool(finite.all()):
        return None
    suspects = (i for i, ok in zip(candidates, finite.tolist(), strict=True) if not ok)
    return next((i for i in suspects if not _exactly_finite(tensors[i])), None)


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _exactly_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())
