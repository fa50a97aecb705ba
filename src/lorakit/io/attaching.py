"""Attaching a checked adapter file to a model: a fresh load, or a hot swap in place.

Every check (keys, shapes, fingerprint, vocabulary: :mod:`lorakit.io.adapter_checks`) runs before
the model changes. Which of an adapter's tensors each file entry fills is its method's answer
(``file_copies``, ``shared_file_copies``); this module only copies, and watches the file while it
does. It works on a model it is given and never builds one, so the model class can offer
:meth:`AdaptedModel.replace_adapter` without an import cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorakit.errors import AdapterFileError
from lorakit.io.adapter_checks import PREFIX, SHARED_PREFIX, Plan, check_against_model
from lorakit.io.reading import WEIGHTS_NAME, AdapterFile, current_file
from lorakit.methods import method_class
from lorakit.methods.base import values_filled_by_caller

if TYPE_CHECKING:
    from lorakit.model import AdaptedModel

log = logging.getLogger("lorakit")


def replace_adapter(
    model: AdaptedModel, name: str, directory: str | Path | AdapterFile, *, trainable: bool = False,
    check_fingerprint: bool = True,
) -> None:
    """Hot swap: the adapter in ``directory`` takes the place of adapter ``name`` for the next forward.

    The file is read, its values checked for NaN/Inf and the adapter checked against the model
    (keys, shapes, fingerprint, vocabulary) before anything changes, so a bad file leaves the
    served set as it was. When the new adapter has the old one's structure (equal config, every
    tensor of the same shape and of the dtype a load gives it, nothing merged, no PiSSA offset or
    Delta-LoRA shift: a retrained version of a served adapter), its values are copied into the old
    adapter's tensors.
    That builds no modules and allocates nothing, which is most of what a load costs (about 150 µs
    of Python per module and fresh pages for every byte). Otherwise the new adapter is loaded
    beside the old one, which is then deleted and its name taken. Either way the adapter keeps its
    place among the active ones, and it is frozen afterwards if it was frozen before or
    ``trainable`` is False (as with :func:`lorakit.load_adapter`, loads are for inference unless asked).
    The values are read from the file until the copy ends: a copy interrupted, or a file written
    meanwhile, removes the adapter rather than serve a mixture of values. ``directory`` may be
    what :func:`lorakit.read_adapter` returned for it, as with :func:`lorakit.load_adapter`.
    """
    model._require(name)
    adapter = current_file(directory)
    plan = check_against_model(model.model, adapter, check_fingerprint, model.adapted_layers())
    frozen = name in model.frozen or not trainable
    pairs = _in_place_pairs(model, name, adapter, plan)
    if pairs is not None:
        try:
            _copy_tensors(pairs)
            _require_unchanged(adapter)
        except BaseException:
            # Every check passed, so only an interruption or a file written during the copy gets
            # here: the adapter holds a mixture of values, and serving that would be worse than
            # not serving it.
            model.delete_adapter(name)
            raise
        model.configs[name] = adapter.config
        if frozen != (name in model.frozen):  # the same tensors: their requires_grad is already right
            model.freeze_adapter(name, frozen)
        log.info("replaced adapter %r in place from %s: %d tensors", name, adapter.source, len(pairs))
        return
    active = model.active
    incoming = f"{name}__incoming"
    while incoming in model.configs:
        incoming += "_"
    attach(model, incoming, adapter, plan, trainable=True, activate=False)
    model.delete_adapter(name)
    model.rename_adapter(incoming, name)
    model.freeze_adapter(name, frozen)
    if name in active:
        model.set_active(*active)


def attach(
    adapted: AdaptedModel, name: str, adapter: AdapterFile, plan: Plan, *, trainable: bool, activate: bool | None
) -> None:
    """Build adapter ``name`` for a checked file and fill it with the file's values."""
    with values_filled_by_caller():  # _copy_tensors fills every tensor the file holds
        adapted.add_adapter(name, adapter.config, activate=activate, every_target=False)
    try:
        _copy_tensors(_copy_pairs(adapted, name, adapter))
        _require_unchanged(adapter)
    except Exception:
        adapted.delete_adapter(name)
        raise
    if not trainable:
        adapted.freeze_adapter(name)
    log.info("loaded adapter %r from %s: %d tensors onto %d modules", name, adapter.source,
             len(adapter.tensors), len(plan.targets))


def _copy_pairs(adapted: AdaptedModel, name: str, adapter: AdapterFile) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(a tensor adapter ``name`` holds, the file's value for it) for every tensor a load writes:
    the one place that maps the file's keys to the adapter's tensors (loads and hot swaps)."""
    tensors = adapter.tensors
    methods = adapted.adapter_modules(name)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for path, method in methods.items():
        pairs += method.file_copies(_Under(tensors, PREFIX + path + "."))
    if methods:
        cls = method_class(adapter.config.method)
        pairs += cls.shared_file_copies(adapted.shared_state_of(name), _Under(tensors, SHARED_PREFIX))
    for path, saved in adapted.saved_modules().items():
        if name in saved.copies:
            prefix = PREFIX + path + "."
            pairs += [(value, tensors[prefix + pname])
                      for pname, value in saved.copies[name].state_dict(keep_vars=True).items()]
    return pairs


def _in_place_pairs(
    model: AdaptedModel, name: str, adapter: AdapterFile, plan: Plan
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The copies that turn adapter ``name`` into the checked file's adapter without building
    anything, or None when the file's adapter is built differently.

    In place must end with the values a fresh load would give: the same config (so the same
    modules, ranks and scalings), no merged copy in the base weight to keep in step, no PiSSA
    offset or Delta-LoRA shift (a load starts without them), and every tensor already of the
    file's shape and of the dtype a load gives it: torch's default dtype for the method's
    tensors, the base module's for a trainable copy. A bf16 file then goes in place into float32
    tensors, converted by the copy exactly as a load converts it. The served tensors keep their
    device (a load copies to the adapter's device too).
    """
    if model.configs[name] != adapter.config:
        return None
    layers = model.layers_of(name)
    saved = {path: module for path, module in model.saved_modules().items() if name in module.copies}
    if sorted(layers) != sorted(plan.targets) or sorted(saved) != sorted(plan.saved):
        return None
    for layer in layers.values():
        if name in layer.merged or not layer.adapters[name].load_restores_all():
            return None
    loaded_dtype = {id(copy): original.dtype for module in saved.values()  # a load deep-copies the original
                    for copy, original in zip(module.copies[name].state_dict(keep_vars=True).values(),
                                              module.original.state_dict(keep_vars=True).values(), strict=True)}
    default = torch.get_default_dtype()
    pairs = _copy_pairs(model, name, adapter)
    if any(dst.shape != src.shape or dst.dtype != loaded_dtype.get(id(dst), default) for dst, src in pairs):
        return None
    return pairs


class _Under(Mapping):
    """The file's tensors whose keys start with ``prefix``, by the rest of the key (no copy of the dict)."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        self.tensors, self.prefix = tensors, prefix

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[self.prefix + name]

    def __iter__(self):
        n = len(self.prefix)
        return (k[n:] for k in self.tensors if k.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@torch.no_grad()
def _copy_tensors(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each file value into its tensor.

    Copies, never ``param.data = value``: the file's tensors are views of a memory map of it
    (safetensors_reader), and a parameter left on it dies with SIGBUS when the file is later rewritten in place
    (PEFT's save_pretrained truncates and rewrites), taking a server down with it. ``copy_``
    also bumps each tensor's version, which DoRA's norm cache and mixed-batch stacks watch.
    """
    for dst, src in pairs:
        dst.copy_(src)


def _require_unchanged(adapter: AdapterFile) -> None:
    """The file's tensors were read through its memory map until now: a write to the file since
    it was read and checked may have put unchecked values (NaN, another version's) in the copy."""
    if adapter.changed():
        raise AdapterFileError(
            f"{Path(adapter.source) / WEIGHTS_NAME} was written while it was being loaded, so the copied values may "
            "mix two versions of it (or unchecked NaN/Inf); the adapter was not kept. Load it again once it is "
            "written; writing to a new file and renaming it into place avoids this."
        )
