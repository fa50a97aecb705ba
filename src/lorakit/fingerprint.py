"""A light fingerprint of the base weights an adapter was trained on.

Hashing every weight of a 7B model on each save would take seconds, and a bit-exact hash would
refuse the same base loaded in another dtype. Instead each adapted module records its weight's
shape and a fixed sample of 32 of its values; two bases match when shapes agree and the samples
agree to bf16 precision. Different pretrained or random weights differ almost everywhere, so a
sample is enough to tell them apart.
"""

from __future__ import annotations

import torch

SAMPLES = 32
RELATIVE_TOLERANCE = 1e-2  # bf16 keeps ~3 significant digits


def weight_fingerprint(weight: torch.Tensor) -> dict | None:
    """Shape and sampled values of one stored weight; None on the meta device."""
    if weight.device.type == "meta":
        return None
    flat = weight.detach().reshape(-1)
    # float32 positions, as every saved fingerprint has them; past 2**24 values the last one can round
    # beyond the end (4096 × 11008, a 7B MLP weight, did), so it is clamped back onto the last value.
    index = torch.linspace(0, flat.numel() - 1, min(SAMPLES, flat.numel())).round().long().clamp_(max=flat.numel() - 1)
    sample = flat[index.to(flat.device)].float().cpu().tolist()
    return {"shape": list(weight.shape), "sample": [float(f"{v:.6g}") for v in sample]}


def fingerprint_mismatch(expected: dict | None, actual: dict | None) -> str | None:
    """Why two fingerprints differ, or None when they match (or either is unknown)."""
    if expected is None or actual is None or expected == actual:  # equal: the same base, as usual
        return None
    if list(expected["shape"]) != list(actual["shape"]):
        return f"weight shape {tuple(actual['shape'])} differs from the trained-on {tuple(expected['shape'])}"
    want = torch.tensor(expected["sample"], dtype=torch.float64)
    have = torch.tensor(actual["sample"], dtype=torch.float64)
    scale = max(want.abs().max().item(), have.abs().max().item(), 1e-12)
    worst = (want - have).abs().max().item()
    if worst > RELATIVE_TOLERANCE * scale:
        return f"sampled weight values differ by up to {worst:.3g} (relative {worst / scale:.2g})"
    return None
