"""``modules_to_save``: a trainable full copy of a module (e.g. a classifier head) per adapter.

The original stays frozen and is used whenever the active adapter has no copy, so switching
adapters switches heads too, and the bare base keeps its own head.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class SavedModule(nn.Module):
    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.mixed: tuple[tuple[str, ...], torch.Tensor] | None = None  # see AdaptedModel.mixed_batch

    def add(self, name: str) -> None:
        duplicate = copy.deepcopy(self.original)
        for p in duplicate.parameters():
            p.requires_grad_(True)
        self.copies[name] = duplicate

    def remove(self, name: str) -> None:
        del self.copies[name]
        if self.active == name:
            self.active = None

    @property
    def device(self) -> torch.device:
        """Where the original's tensors are (mixed batches pick rows on it); the CPU if it has none."""
        first = next(iter((*self.original.parameters(), *self.original.buffers())), None)
        return first.device if first is not None else torch.device("cpu")

    def set_active(self, names: tuple[str, ...]) -> None:
        """The first active adapter that has a copy wins (a head cannot be summed)."""
        self.active = next((n for n in names if n in self.copies), None)

    def current(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original
        return self.copies[self.active]

    def forward(self, *args, **kwargs):
        if self.mixed is not None and not self.disabled:
            return self._mixed_forward(*args, **kwargs)
        return self.current()(*args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs):
        """Each row through its adapter's copy (or the original): one call per copy in the batch."""
        names, rows = self.mixed
        out = self.original(x, *args, **kwargs)
        for slot, name in enumerate(names, start=1):
            picked = (rows == slot).nonzero().flatten()
            if name in self.copies and picked.numel():
                out = out.index_copy(0, picked, self.copies[name](x.index_select(0, picked), *args, **kwargs))
        return out

    def rename(self, old: str, new: str) -> None:
        self.copies[new] = self.copies.pop(old)
        if self.active == old:
            self.active = new
