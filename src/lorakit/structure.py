"""A process-wide count of structural changes to adapters.

Why: mixed-adapter batches keep, per adapter, the list of its tensors, and ask each batch
whether any of them changed by summing their versions (:class:`lorakit.mixed.AdapterVersions`).
Versions see in-place writes, but not a tensor replaced by another object: an adapter added,
removed or renamed on a layer, a tensor assigned to a method, or a module converted by
``.to()``. Those places call :func:`structure_changed`, and the lists are rebuilt.
"""

from __future__ import annotations

_count = 0


def structure_changed() -> None:
    global _count
    _count += 1


def structure_generation() -> int:
    return _count
