"""``modules_to_save``: a trainable full copy of a module (e.g. a classifier head) per adapter.

The original stays frozen and is used whenever the active adapter has no copy, so switching
adapters switches heads too, and the bare base keeps its own head.
"""

from __future__ import annotations

import copy

from torch import nn


class SavedModule(nn.Module):
    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        duplicate = copy.deepcopy(self.original)
        for p in duplicate.parameters():
            p.requires_grad_(True)
        self.copies[name] = duplicate

    def remove(self, name: str) -> None:
        del self.copies[name]
        if self.active == name:
            self.active = None

    def set_active(self, names: tuple[str, ...]) -> None:
        """The first active adapter that has a copy wins (a head cannot be summed)."""
        self.active = next((n for n in names if n in self.copies), None)

    def current(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original
        return self.copies[self.active]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)
