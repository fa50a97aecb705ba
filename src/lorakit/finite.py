"""One check for NaN / ±Inf, used before a merge writes W and before a file's tensors are used."""

from __future__ import annotations

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
    if torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)):
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())
