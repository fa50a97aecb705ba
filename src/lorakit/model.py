"""A model carrying named adapters: add, activate, delete, merge, unload.

``adapt(model, config)`` wraps the chosen layers of the user's model in place (the model's own
class is untouched) and returns an :class:`AdaptedModel` that owns the adapter bookkeeping.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.config import AdapterConfig
from lorakit.errors import AdapterNotFoundError, ConfigError
from lorakit.inits import initialise
from lorakit.io.attaching import replace_adapter as _replace_adapter
from lorakit.kinds import kind_for
from lorakit.kinds_quantized import base_fingerprint, quantized_kind
from lorakit.layer import AdaptedLayer, refuse_unmergeable
from lorakit.methods import method_class
from lorakit.methods.base import AdapterMethod
from lorakit.mixed import BASE, AdapterVersions, plan_batch
from lorakit.report import summary_line
from lorakit.saved_modules import SavedModule
from lorakit.targets import matches_rules, plain_modules, resolve_targets

if TYPE_CHECKING:
    from pathlib import Path

    from lorakit.io.reading import AdapterFile

LossFn = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    method: str
    rank: int
    modules: int
    trainable_params: int  # what training it updates (not LoRA-FA's frozen A, not VeRA's shared projections)
    params: int  # every tensor the adapter holds of its own
    active: bool
    merged: bool


class AdaptedModel(nn.Module):
    """The user's model plus lorakit's adapters. Call it as you would call the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.configs: dict[str, AdapterConfig] = {}
        self.active: tuple[str, ...] = ()
        # State a method shares across the layers of one adapter (AdapterMethod.shared_state, e.g.
        # VeRA's projections), by adapter name; a module, so it moves with the model.
        self.shared = nn.ModuleDict()
        self.frozen: set[str] = set()  # adapters loaded for inference: never trainable
        # Registries of the wrappers lorakit inserted, so no operation walks every module
        # (that would grow with the number of adapters loaded).
        self._layers: dict[str, AdaptedLayer] = {}
        self._saved: dict[str, SavedModule] = {}
        self._versions = AdapterVersions()  # mixed batches: has an adapter changed since the last batch?
        for p in model.parameters():
            p.requires_grad_(False)
        self.train(model.training)

    # -- calling -----------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """Run the model. ``adapter_names`` (one per batch row; "base" or None for the bare base)
        runs a mixed-adapter batch instead of the active adapters."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """``model.generate``; with ``adapter_names`` each row generates with its own adapter."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Sequence[str | None]) -> Iterator[None]:
        """Inside the block, row i of every batch runs through adapter ``adapter_names[i]``.

        Unknown names are errors (never a silent fall-back to the base). Merged adapters must be
        unmerged first: a mixed batch needs the bare base weights. Rows of a method that is not
        ``mixable`` run through that method on their own; the other rows are batched as usual.
        """
        names = [BASE if n is None else n for n in adapter_names]
        unknown = sorted({n for n in names if n != BASE and n not in self.configs})
        if unknown:
            known = ", ".join(self.configs) or "none"
            raise AdapterNotFoundError(f"unknown adapter names in the batch: {unknown} (loaded: {known}; "
                                       f"use {BASE!r} for the bare base)")
        if any(layer.merged for layer in self._layers.values()):
            raise ConfigError("a mixed-adapter batch needs unmerged adapters; call unmerge() first")
        unique = tuple(dict.fromkeys(n for n in names if n != BASE))
        slot = {n: i + 1 for i, n in enumerate(unique)}
        rows_cpu = torch.tensor([slot.get(n, 0) for n in names], dtype=torch.long)
        layers = list(self._layers.values())
        for layer, plan in zip(layers, plan_batch(layers, unique, rows_cpu, self._versions.of(unique, layers)),
                               strict=True):
            layer.batch_plan = plan
        for saved in self._saved.values():
            saved.mixed = (unique, rows_cpu.to(saved.device))
        try:
            yield
        finally:
            for layer in layers:
                layer.batch_plan = None
            for saved in self._saved.values():
                saved.mixed = None

    # -- the layers lorakit added ------------------------------------------------------------
    def adapted_layers(self) -> dict[str, AdaptedLayer]:
        return dict(self._layers)

    def saved_modules(self) -> dict[str, SavedModule]:
        return dict(self._saved)

    def layers_of(self, name: str) -> dict[str, AdaptedLayer]:
        self._require(name)
        return {n: layer for n, layer in self.adapted_layers().items() if name in layer.adapters}

    def adapter_modules(self, name: str) -> dict[str, AdapterMethod]:
        """Module path → this adapter's method instance on that module."""
        return {n: layer.adapters[name] for n, layer in self.layers_of(name).items()}

    # -- adding and removing -----------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        config: AdapterConfig,
        *,
        gradient_loss: LossFn | None = None,
        activate: bool | None = None,
        every_target: bool = True,
    ) -> None:
        """Attach a new adapter. ``gradient_loss`` is required by the gradient-SVD init.

        The first adapter becomes active; later ones become active when ``activate`` is True.
        Every name in a list of ``target_modules`` must match a module (``every_target``;
        loading a file turns it off, as other tools save names their model lacked).
        """
        if not name or "." in name:
            raise ConfigError(f"adapter name {name!r} must be non-empty and contain no '.'")
        if name in self.configs:
            raise ConfigError(f"an adapter named {name!r} is already loaded; delete it first or pick another name")
        if config.init == "gradient-svd" and gradient_loss is None:
            raise ConfigError("init 'gradient-svd' needs gradient_loss: a callable returning a loss on a few batches")
        modules = plain_modules(self.model)
        paths = resolve_targets(self.model, config, modules, every_name=every_target)
        saved = [n for n in modules if config.modules_to_save and matches_rules(n, config.modules_to_save)]
        if config.modules_to_save and not saved:
            raise ConfigError(f"modules_to_save {list(config.modules_to_save)} matched no module of the model")
        cls = method_class(config.method)
        shared = self._shared_state(name, cls, config, [modules[p] for p in paths])
        for path in paths:
            layer = self._wrap(path)
            layer.add(name, build_method(cls, config, path, layer, shared))
        for path in saved:
            self._wrap_saved(path).add(name)
        self.configs[name] = config
        initialise(self, self.layers_of(name), name, config, gradient_loss)
        if activate or (activate is None and not self.active):
            self.set_active(*self.active, name)
        else:
            self._sync_trainable({name})

    def replace_adapter(self, name: str, directory: str | Path | AdapterFile, **load_options) -> None:
        """Hot swap: the adapter in ``directory`` takes the place of adapter ``name`` for the next batch.

        The file is checked completely (values, keys, shapes, fingerprint) before the old adapter
        is touched; on any error the served set is unchanged. A retrained version of the same
        adapter is copied into the old one's tensors; see :func:`lorakit.io.attaching.replace_adapter`.
        """
        _replace_adapter(self, name, directory, **load_options)

    def rename_adapter(self, old: str, new: str) -> None:
        self._require(old)
        if new in self.configs or not new or "." in new:
            raise ConfigError(f"cannot rename {old!r} to {new!r}: the name is taken or invalid")
        for layer in self.layers_of(old).values():
            layer.rename(old, new)
        for saved in self._saved.values():
            if old in saved.copies:
                saved.rename(old, new)
        if old in self.shared:
            self.shared[new] = self.shared.pop(old)
        self.configs[new] = self.configs.pop(old)
        if old in self.frozen:
            self.frozen.discard(old)
            self.frozen.add(new)
        self.active = tuple(new if a == old else a for a in self.active)

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter everywhere and free its tensors (base weights are restored)."""
        self._require(name)
        for layer in self.layers_of(name).values():
            layer.remove(name)
        for saved in self.saved_modules().values():
            if name in saved.copies:
                saved.remove(name)
        if name in self.shared:
            del self.shared[name]
        del self.configs[name]
        self.frozen.discard(name)
        self.set_active(*(a for a in self.active if a != name))

    # -- which adapters run ------------------------------------------------------------------
    def set_active(self, *names: str) -> None:
        """Exactly these adapters run (their updates add up); their tensors become trainable."""
        for n in names:
            self._require(n)
        changed = set(self.active) ^ set(names)
        self.active = tuple(dict.fromkeys(names))
        for layer in self._layers.values():
            layer.active = tuple(n for n in self.active if n in layer.adapters)
        for saved in self._saved.values():
            saved.set_active(self.active)
        self._sync_trainable(changed)

    def activate(self, name: str) -> None:
        self.set_active(*self.active, name)

    def deactivate(self, name: str) -> None:
        self._require(name)
        self.set_active(*(a for a in self.active if a != name))

    def freeze_adapter(self, name: str, frozen: bool = True) -> None:
        """Mark an adapter inference-only (no tensor requires grad), or trainable again."""
        self._require(name)
        (self.frozen.add if frozen else self.frozen.discard)(name)
        self._sync_trainable({name})

    @contextlib.contextmanager
    def base_only(self) -> Iterator[nn.Module]:
        """Run the bare base model inside the block (merged adapters are taken out and put back)."""
        layers = self.adapted_layers()
        saved = self.saved_modules()
        merged = {path: list(layer.merged) for path, layer in layers.items()}
        for layer in layers.values():
            layer.unmerge()
            layer.disabled = True
        for module in saved.values():
            module.disabled = True
        try:
            yield self.model
        finally:
            for path, layer in layers.items():
                layer.disabled = False
                layer.merge(merged[path])
            for module in saved.values():
                module.disabled = False

    def list_adapters(self) -> list[AdapterInfo]:
        infos = []
        for name, config in self.configs.items():
            layers = self.layers_of(name)
            params = sum(p.numel() for p in self._adapter_parameters(name))
            trainable = sum(p.numel() for p in self._adapter_parameters(name, trainable_only=True))
            infos.append(
                AdapterInfo(
                    name=name, method=config.method, rank=config.r, modules=len(layers),
                    trainable_params=trainable, params=params, active=name in self.active,
                    merged=any(name in layer.merged for layer in layers.values()),
                )
            )
        return infos

    # -- merging -----------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None) -> None:
        """Write adapters (default: the active ones) into the base weights, exactly reversibly.

        An adapter whose method is not ``mergeable`` is refused before any layer changes."""
        names = list(self.active if names is None else names)
        self._require_mergeable(names)
        for layer in self.adapted_layers().values():
            layer.merge(names)

    def unmerge(self, names: list[str] | None = None) -> None:
        """Take merged adapters (default: all) back out of the base weights."""
        if names is not None:
            self._require_mergeable(names)  # naming one that can never be merged is a mistake worth saying
        for layer in self.adapted_layers().values():
            layer.unmerge(names)

    def merge_and_unload(self, names: list[str] | None = None) -> nn.Module:
        """Merge, then return the user's model with every lorakit module removed.

        Trainable copies (modules_to_save) of the first merged adapter replace the originals.
        The AdaptedModel is empty afterwards. A quantised (bitsandbytes) base cannot hold a
        merge: every quantised layer becomes a plain nn.Linear holding its dequantised weight
        (plus the update, computed in float32), and a warning says so.
        """
        names = list(self.active if names is None else names)
        self._require_mergeable(names)
        # Quantised bases cannot hold a merge: they become plain layers (dequantised W + update).
        plain = {p: layer.dequantised_merge(names) for p, layer in self._layers.items() if not layer.kind.writable}
        for layer in self._layers.values():
            if layer.kind.writable:
                layer.merge(names)
        for path, layer in self._layers.items():
            _set_module(self.model, path, plain[path][0] if path in plain else layer.base_layer)
        for path, saved in self._saved.items():
            chosen = next((saved.copies[n] for n in names if n in saved.copies), saved.original)
            _set_module(self.model, path, chosen)
        self._layers, self._saved = {}, {}
        self.configs.clear()
        self.active = ()
        self.shared = nn.ModuleDict()
        if plain or any(quantized_kind(m) is not None for m in self.model.modules()):
            _report_dequantised(self.model, {p: moved for p, (_, moved) in plain.items()})
        return self.model

    def unload(self) -> nn.Module:
        """Remove all adapters without merging and return the bare base model."""
        for name in list(self.configs):
            self.delete_adapter(name)
        for path, layer in self._layers.items():
            _set_module(self.model, path, layer.base_layer)
        for path, saved in self._saved.items():
            _set_module(self.model, path, saved.original)
        self._layers, self._saved = {}, {}
        return self.model

    # -- reports -----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_summary(self) -> str:
        return summary_line(self)

    def shared_state_of(self, name: str) -> nn.Module | None:
        """Adapter ``name``'s shared state (:meth:`AdapterMethod.shared_state`), or None when its method has none."""
        self._require(name)
        return self.shared[name] if name in self.shared else None  # noqa: SIM401 (ModuleDict has no get)

    @property
    def vera_projections(self) -> nn.ModuleDict:
        """The older name of :attr:`shared` (VeRA's projections are its shared state)."""
        return self.shared

    def print_trainable_parameters(self) -> None:
        print(self.parameter_summary())

    # -- internals ---------------------------------------------------------------------------
    def _require(self, name: str) -> None:
        if name not in self.configs:
            known = ", ".join(self.configs) or "none"
            raise AdapterNotFoundError(f"no adapter named {name!r} on this model (loaded: {known})")

    def _require_mergeable(self, names: list[str]) -> None:
        """Every name is loaded and its method can be merged: checked before any layer changes."""
        for n in names:
            self._require(n)
        for n in names:
            layer = next(iter(self.layers_of(n).values()), None)
            if layer is not None:
                refuse_unmergeable({n: layer.adapters[n]})

    def _adapter_parameters(self, name: str, trainable_only: bool = False) -> list[nn.Parameter]:
        """The adapter's own tensors; with ``trainable_only``, those its method trains (whatever
        requires_grad says now: an inactive or frozen adapter's are switched off)."""
        params = [p for m in self.adapter_modules(name).values() for pname, p in m.named_parameters(recurse=False)
                  if not trainable_only or pname in m.trainable]
        params += [p for s in self.saved_modules().values() if name in s.copies for p in s.copies[name].parameters()]
        return params

    def _sync_trainable(self, names: set[str]) -> None:
        """Active adapters' own trainable tensors require grad; everything else is frozen."""
        for name in names & set(self.configs):
            on = name in self.active and name not in self.frozen
            for module in self.adapter_modules(name).values():
                for pname, p in module.named_parameters(recurse=False):
                    p.requires_grad_(on and pname in module.trainable)
            for saved in self.saved_modules().values():
                if name in saved.copies:
                    for p in saved.copies[name].parameters():
                        p.requires_grad_(on)

    def _wrap(self, path: str) -> AdaptedLayer:
        current = self.model.get_submodule(path)
        if isinstance(current, AdaptedLayer):
            return current
        kind = kind_for(current)
        if kind is None:  # resolve_targets only returns adaptable modules
            raise ConfigError(f"module {path!r} ({type(current).__name__}) cannot be adapted")
        layer = AdaptedLayer(current, kind).train(current.training)  # new modules would default to training
        layer.fingerprint = base_fingerprint(current)
        _set_module(self.model, path, layer)
        self._layers[path] = layer
        return layer

    def _wrap_saved(self, path: str) -> SavedModule:
        current = self.model.get_submodule(path)
        if isinstance(current, SavedModule):
            return current
        saved = SavedModule(current).train(current.training)
        _set_module(self.model, path, saved)
        self._saved[path] = saved
        return saved

    def _shared_state(self, name: str, cls: type[AdapterMethod], config: AdapterConfig,
                      bases: list[nn.Module]) -> nn.Module | None:
        """The method's state shared by the adapter's layers, on the base's device, kept under ``name``."""
        if not bases:
            return None
        shared = cls.shared_state(config, [kind_for(b) for b in bases])
        if shared is None:
            return None
        device = bases[0].weight.device
        shared.to(device=device if device.type != "meta" else torch.device("cpu")).train(self.training)
        self.shared[name] = shared
        return shared


def build_method(cls: type[AdapterMethod], config: AdapterConfig, path: str, layer: AdaptedLayer,
                 shared: nn.Module | None) -> AdapterMethod:
    """One method instance for one module, on the layer's device, attached to its base layer."""
    method = cls.create(layer.kind, config, path, shared)
    if layer.adapter_device.type != "cpu":  # built on the CPU
        method.to(device=layer.adapter_device)
    method.attach(layer.base_layer)
    return method


def adapt(model: nn.Module, config: AdapterConfig | None = None, name: str = "default", **kwargs) -> AdaptedModel:
    """Freeze ``model``, attach adapter ``name`` and return the AdaptedModel that carries it."""
    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    adapted.add_adapter(name, config or AdapterConfig(), **kwargs)
    return adapted


def _report_dequantised(model: nn.Module, moved: dict[str, float]) -> None:
    """Dequantise the layers no adapter touched too, and say plainly what the result is."""
    from lorakit.quantize import dequantize_model

    others = dequantize_model(model)
    worst = max(moved, key=moved.get) if moved else None
    message = (
        f"merge_and_unload: the base was quantised (bitsandbytes 4-bit/8-bit), so the merged model is "
        f"dequantised: {len(moved) + len(others)} quantised layers are now plain nn.Linear holding the "
        f"dequantised weight ({len(moved)} with the adapter update added in float32). "
    )
    if worst is not None:
        message += f"Largest |ΔW| from the quantised base: {moved[worst]:.3g} (in {worst}). "
    message += ("Its weights carry the quantisation error; merging the adapter into the full-precision base "
                "(lorakit merge) gives the original weights plus the update.")
    warnings.warn(message, UserWarning, stacklevel=3)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)
