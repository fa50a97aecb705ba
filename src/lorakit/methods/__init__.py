"""The registry of adapter methods: adding a method is one file and one line here (BUILT_IN).

Everything that lists methods reads :data:`METHODS`: AdapterConfig's validation, the train
command's ``--method`` choices, file loading (by ``peft_type``), the contract tests. A method
defined elsewhere (a plug-in, a test) is added with :func:`register_method` and removed with
:func:`unregister_method`. The protocol a method follows is in :mod:`lorakit.methods.base`.
"""

from __future__ import annotations

from lorakit.errors import ConfigError
from lorakit.methods.base import AdapterMethod, check_method_class
from lorakit.methods.cera import CeRA
from lorakit.methods.dora import DoRA
from lorakit.methods.gpart import GPart
from lorakit.methods.lora import LoRA, LoRAFA
from lorakit.methods.sds_lora import SDSLoRA
from lorakit.methods.vera import VeRA, VeraProjections

BUILT_IN: tuple[type[AdapterMethod], ...] = (LoRA, LoRAFA, DoRA, VeRA, CeRA, GPart, SDSLoRA)

METHODS: dict[str, type[AdapterMethod]] = {}


def register_method(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    """Add a method class under its ``method_name`` (usable as a class decorator).

    Its declarations are checked now, so a method missing what it claims fails here rather than
    in the middle of a merge. Registering the same class again is a no-op.
    """
    check_method_class(cls)
    present = METHODS.get(cls.method_name)
    if present is not None and present is not cls:
        raise ConfigError(f"a method named {cls.method_name!r} is already registered ({present.__qualname__}); "
                          "unregister it first or choose another method_name")
    METHODS[cls.method_name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (adapters built with it keep working,
    but no new ones can be configured). The built-in methods stay."""
    if any(cls.method_name == name for cls in BUILT_IN):
        raise ConfigError(f"{name!r} is a built-in method and cannot be unregistered")
    METHODS.pop(name, None)


def method_class(name: str) -> type[AdapterMethod]:
    """The registered class of method ``name``, or a ConfigError naming the choices."""
    cls = METHODS.get(name)
    if cls is None:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return cls


def require_mergeable(adapter: str, method: str) -> None:
    """A ConfigError when adapter ``adapter``'s method cannot be merged (callers check before changing anything)."""
    cls = method_class(method)
    if not cls.mergeable:
        raise ConfigError(f"adapter {adapter!r} ({cls.method_name}) cannot be merged: {cls.why_not_mergeable}; "
                          "serve it unmerged")


def require_combinable(adapter: str, method: str) -> None:
    """A ConfigError when adapter ``adapter``'s method cannot be combined with others."""
    cls = method_class(method)
    if not cls.combinable:
        raise ConfigError(f"adapter {adapter!r} ({cls.method_name}) cannot be combined: combining needs its update "
                          f"as low-rank factors ΔW = B·A, which method {cls.method_name!r} does not give")


def method_for_file_type(peft_type: object) -> type[AdapterMethod] | None:
    """The method that reads files of ``peft_type``: the first registered one that writes it
    (LoRA reads "LORA" files, DoRA's ``use_dora`` included), or None."""
    return next((cls for cls in METHODS.values() if cls.file_type() == peft_type), None)


for _cls in BUILT_IN:
    register_method(_cls)

__all__ = ["BUILT_IN", "METHODS", "AdapterMethod", "CeRA", "DoRA", "GPart", "LoRA", "LoRAFA", "SDSLoRA", "VeRA",
           "VeraProjections",
           "method_class", "method_for_file_type", "register_method", "require_combinable",
           "require_mergeable", "unregister_method"]
