"""Counting memory on a model whose tensors have no values: static bytes by category, and the
live bytes of every tensor an operation makes, over time.

:class:`LiveBytes` sees each operation's outputs through a dispatch mode and follows their
storages with weak references, so a tensor counts from the operation that made it until the last
reference to its storage dies (autograd freeing a saved tensor in backward included). Views share
their base's storage and count once. The same counter runs on real tensors, which is how the
tests check that the shape-only run allocates what a real run does.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied or viewed tensors count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[id(s)] = s.nbytes()  # the tensors keep their storages (and so the ids) alive meanwhile
    return sum(seen.values())


@dataclass(frozen=True)
class StaticBytes:
    """What stays in memory between steps."""

    base: int  # the frozen model's parameters and buffers (NF4 codes and statistics included)
    adapter: int  # every tensor the adapters hold (trainable or not) and trained head copies
    trainable: int  # bytes of the parameters that receive gradients: what their gradients take
    trainable_params: int
    base_params: int  # parameters of the base model (an NF4 weight counts its out × in values, not its bytes)


def static_bytes(model: nn.Module) -> StaticBytes:
    """Base, adapter and trainable bytes of a (possibly adapted) model, each storage once."""
    from lorakit.layer import AdaptedLayer
    from lorakit.model import AdaptedModel
    from lorakit.saved_modules import SavedModule

    adapter_ids: set[int] = set()
    for module in model.modules():
        owned: list[nn.Module] = []
        if isinstance(module, AdaptedLayer):
            owned = list(module.adapters.values())
        elif isinstance(module, SavedModule):
            owned = list(module.copies.values())
        elif isinstance(module, AdaptedModel):
            owned = [module.shared]
        for part in owned:
            adapter_ids |= {id(t) for t in (*part.parameters(), *part.buffers())}
    every = {id(t): t for t in (*model.parameters(), *model.buffers())}
    adapter = [t for i, t in every.items() if i in adapter_ids]
    base = [t for i, t in every.items() if i not in adapter_ids]
    trainable = [p for p in model.parameters() if p.requires_grad]
    from lorakit.plan.nf4 import PlannedLinear4bit

    packed = {id(m.weight): m.out_features * m.in_features for m in model.modules() if isinstance(m, PlannedLinear4bit)}
    return StaticBytes(
        base=storage_bytes(base), adapter=storage_bytes(adapter), trainable=storage_bytes(trainable),
        trainable_params=sum(p.numel() for p in trainable),
        base_params=sum(packed.get(id(t), t.numel()) for t in base if isinstance(t, nn.Parameter)))


class LiveBytes(TorchDispatchMode):
    """Live bytes of the tensors operations make while the mode is on, as a timeline of events.

    Storages present before (``known``: weights, optimizer state) are never counted. ``marks``
    records named points (e.g. the end of the forward). Call :meth:`timeline` afterwards with the
    storages to count apart (gradients).
    """

    def __init__(self, known: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.known = WeakIdKeyDictionary()
        for t in known:
            self.known[t.untyped_storage()] = True
        self.tokens = WeakIdKeyDictionary()  # storage → its number in the event log
        self.sizes: list[int] = []  # by token: the storage's bytes as last seen
        self.events: list[tuple[int, int]] = []  # (token, change in bytes)
        self.marks: dict[str, int] = {}  # name → number of events before it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._see(t.untyped_storage())
        return out

    def _see(self, storage: torch.UntypedStorage) -> None:
        if storage in self.known:
            return
        size = storage.nbytes()
        token = self.tokens.get(storage)
        if token is None:
            token = len(self.sizes)
            self.tokens[storage] = token
            self.sizes.append(size)
            self.events.append((token, size))
            weakref.finalize(storage, self._free, token)
        elif size != self.sizes[token]:  # resized in place (an out= operation)
            self.events.append((token, size - self.sizes[token]))
            self.sizes[token] = size

    def _free(self, token: int) -> None:
        self.events.append((token, -self.sizes[token]))

    def mark(self, name: str) -> None:
        self.marks[name] = len(self.events)

    def token_of(self, tensor: torch.Tensor) -> int | None:
        return self.tokens.get(tensor.untyped_storage())

    def timeline(self, apart: set[int] = frozenset()) -> tuple[list[int], list[int]]:
        """Live bytes after each event: (everything but the ``apart`` tokens, the ``apart`` ones)."""
        other, separate = [], []
        now_other = now_separate = 0
        for token, change in self.events:
            if token in apart:
                now_separate += change
            else:
                now_other += change
            other.append(now_other)
            separate.append(now_separate)
        return other, separate


class SavedBytes:
    """Bytes autograd saves for backward (``saved_tensors_hooks``), each storage once, the
    ``known`` storages (weights) left out: the figure the benchmarks and tests compare."""

    def __init__(self, known: Iterable[torch.Tensor] = ()) -> None:
        self.known = WeakIdKeyDictionary()
        for t in known:
            self.known[t.untyped_storage()] = True
        self.saved = WeakIdKeyDictionary()
        self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s not in self.known and s not in self.saved:
            self.saved[s] = True
            self.total += s.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
