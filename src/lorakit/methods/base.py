"""The protocol every adapter method follows, so that a method is one file plus one registry line.

A method owns its tensors on one base layer. It never touches the base layer's parameters
itself (the wrapping :class:`lorakit.layer.AdaptedLayer` does, so merge bookkeeping lives in one
place), and nothing outside it knows its tensor names: merging, mixed batches, combining, files,
LoRA+ and inits read what the class declares and call its hooks. Whatever a method cannot do is
refused from its declarations before anything changes (a merge that fails halfway would leave
some layers merged).

What a method declares (class attributes):

    method_name        its registry name ("lora", "vera", ...)
    title              how messages spell it ("VeRA"; default: the method name)
    peft_type          PEFT's ``peft_type`` for its files; None: lorakit's own ("LORAKIT_<NAME>"),
                       same folder layout, loaded back exactly by lorakit and refused by PEFT
    mergeable          its update is a change of W: merge, unmerge, merge_and_unload and
                       ``lorakit merge`` accept it (``why_not_mergeable`` says why not)
    mixable            ``factors()`` (and ``output_scale``) give each row's update, so mixed batches
                       stack it with other adapters; the rows of a method that is not mixable run
                       through its own ``forward`` instead (exact; one call per such adapter)
    combinable         ``exported_factors()`` give its whole update as ΔW = B A: combine accepts it
    additive           a merge is W + ΔW (False for DoRA, which rescales rows)
    reads_base_weight  its output depends on W beyond W x (DoRA's norm): cached copies of its
                       update (mixed-batch stacks) watch W too
    trainable          the names of its tensors that train
    up_tensors         the names of its "up" tensors (B-like), which LoRA+ trains ``ratio`` × faster
    inits              the inits it supports ("default" always); others are refused by AdapterConfig
    Options            a frozen dataclass of its own options (``AdapterConfig.options``), whose
                       ``__post_init__`` validates them

What it implements (defaults in brackets):

    create(kind, config, path, shared)   one instance for one module [cls(kind, rank, scaling, dropout)]
    scaling_for(config, path)             its scaling s [alpha / r, or alpha / √r with rsLoRA]
    shared_state(config, kinds)           a module built once per adapter and handed to every layer's
                                          ``create`` (VeRA's projections) [None]
    attach(base_layer)                    called once it sits on its layer's device [nothing]
    initialise(init, base_layer, gradient)  fill its tensors for a non-default init [refuse]
    forward(x, base_out, base_layer)      the layer output with its update [base_out + B A x]
    fused_factors()                       (A, B, s) for the one-node training path [from factors]
    fused_update(base_layer)              the update as the one-node path computes it, vectors and
                                          output scale included (VeRA, DoRA) [from fused_factors]
    factors(), output_scale(base_layer)   its update as factors (mixable, mergeable, combinable)
    delta_weight()                        its update as an (out, in) matrix, for merging [B A]
    merged_weight / unmerged_weight       W with its update written in / taken out [W ± delta_weight()]
    exported_factors()                    the whole change from the original W as factors [factors]
    take_combination(A, B_scaled, inputs) become a combination of adapters (combine) [refuse]
    weight_shift()                        a change it made to W in memory, undone on removal [None]
    load_restores_all()                   a fresh load of its file rebuilds it exactly [True]
    file_tensors(), file_copies(tensors)  its tensors as its file holds them, and back
                                          [its own parameters and persistent buffers]
    expected_shapes(kind, config, path)   the shapes a file must hold for one module [built on meta]
    shared_file_tensors(shared), shared_file_copies(shared, tensors),
    expected_shared_shapes(config, kinds) the same for the shared state [none]
    peft_config_fields(config, modules, per_module), config_from_peft(data, source),
    peft_config_keys                      its part of ``adapter_config.json`` [lorakit's own spelling]
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.fused import FusedUpdate
from lorakit.kinds_base import LayerKind
from lorakit.structure import structure_changed

if TYPE_CHECKING:
    from lorakit.config import AdapterConfig

# per_module(values by module path) -> (the most common value, {pattern: value} for the others),
# with pattern keys that PEFT's rule and lorakit's match to that module alone (io.peft_config).
PerModule = Callable[[Mapping[str, Any]], tuple[Any, dict[str, Any]]]

_FILLED_BY_CALLER = contextvars.ContextVar("lorakit_values_filled_by_caller", default=False)


@contextlib.contextmanager
def values_filled_by_caller() -> Iterator[None]:
    """Inside the block new methods may skip random inits: the caller overwrites every tensor
    (loading a file). Kaiming init of a 7B model's r=16 A matrices costs more than reading the file."""
    token = _FILLED_BY_CALLER.set(True)
    try:
        yield
    finally:
        _FILLED_BY_CALLER.reset(token)


def filled_by_caller() -> bool:
    return _FILLED_BY_CALLER.get()


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""


class AdapterMethod(nn.Module):
    """One named adapter on one base layer; see the module docstring for the protocol."""

    method_name: ClassVar[str]
    title: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None
    mergeable: ClassVar[bool] = True
    mixable: ClassVar[bool] = True
    combinable: ClassVar[bool] = True
    additive: ClassVar[bool] = True
    reads_base_weight: ClassVar[bool] = False
    why_not_mergeable: ClassVar[str] = "its update is not a change of the base weight"
    trainable: ClassVar[tuple[str, ...]] = ()
    up_tensors: ClassVar[tuple[str, ...]] = ()
    inits: ClassVar[tuple[str, ...]] = ("default",)
    Options: ClassVar[type] = NoOptions
    # adapter_config.json keys config_from_peft reads (others are refused unless at a default value)
    peft_config_keys: ClassVar[frozenset[str]] = frozenset(
        {"r", "alpha", "rank_pattern", "alpha_pattern", "dropout", "use_rslora", "options"})

    def __init__(self, kind: LayerKind, rank: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        self.rank = rank
        self.scaling = scaling
        self.dropout: nn.Module = (
            nn.Dropout(dropout) if dropout > 0 and kind.supports_dropout() else nn.Identity()
        )

    # Mixed batches keep per-adapter lists of tensors (lorakit.mixed.AdapterVersions); a tensor
    # assigned, registered or converted to a new object must invalidate them.
    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if isinstance(value, torch.Tensor):
            structure_changed()

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        structure_changed()

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        structure_changed()
        return result

    # -- names, options, capabilities ----------------------------------------------------------
    @classmethod
    def file_type(cls) -> str:
        """The ``peft_type`` its files carry: PEFT's, or lorakit's own for a method PEFT lacks."""
        return cls.peft_type or "LORAKIT_" + cls.method_name.upper().replace("-", "_")

    @classmethod
    def options_from(cls, given: Any) -> Any:
        """``given`` (None, a mapping, or an options dataclass) as this method's ``Options``."""
        if isinstance(given, cls.Options):
            return given
        if given is None:
            given = {}
        elif dataclasses.is_dataclass(given) and not isinstance(given, type):
            given = dataclasses.asdict(given)
        if not isinstance(given, Mapping):
            raise ConfigError(f"options of {cls.display_name()} must be a mapping of names to values, got {given!r}")
        known = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            has = f"its options are {', '.join(known)}" if known else "it has none"
            raise ConfigError(f"{cls.display_name()} has no option {', '.join(map(repr, unknown))}; {has}")
        try:
            return cls.Options(**given)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"options of {cls.display_name()}: {exc}") from exc

    @classmethod
    def check_config(cls, config: AdapterConfig) -> None:
        """Refuse settings this method cannot honour (called by AdapterConfig)."""
        if config.init not in cls.inits:
            raise ConfigError(f"{cls.display_name()} does not support init {config.init!r}; it supports "
                              f"{', '.join(map(repr, cls.inits))}")

    @classmethod
    def display_name(cls) -> str:
        """"VeRA (method 'vera')" for messages."""
        return f"{cls.title} (method {cls.method_name!r})" if cls.title else f"method {cls.method_name!r}"

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def scaling_for(cls, config: AdapterConfig, path: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        rank, alpha = config.rank_for(path), config.alpha_for(path)
        return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank

    @classmethod
    def shared_state(cls, config: AdapterConfig, kinds: Sequence[LayerKind]) -> nn.Module | None:
        """State shared by every layer of one adapter (built once, on the CPU; the model moves it
        to the base's device and keeps it while the adapter lives), or None."""
        return None

    @classmethod
    def create(cls, kind: LayerKind, config: AdapterConfig, path: str, shared: nn.Module | None) -> AdapterMethod:
        """One instance for the module at ``path``, on the CPU."""
        return cls(kind, config.rank_for(path), cls.scaling_for(config, path), config.dropout)

    def attach(self, base_layer: nn.Module) -> None:
        """Called once, after the instance was moved to its base layer's device (the base may be
        on the meta device: shapes only, nothing to read)."""

    def initialise(self, init: str, base_layer: nn.Module, gradient: torch.Tensor | None) -> None:
        """Fill the tensors for ``init`` (one of ``inits`` other than "default"); ``gradient`` is
        dL/dW as an (out, in) matrix for "gradient-svd", else None."""
        raise ConfigError(f"method {self.method_name!r} lists init {init!r} but does not implement it")

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, *, inplace: bool = False
    ) -> torch.Tensor:
        """The layer output with this adapter applied, given the base layer's output.

        ``inplace=True`` says the caller owns ``base_out``: the update is written into it.
        """
        A, B = self.factors()
        out = base_out if inplace else base_out.clone()
        return self.kind.add_up_(out, self.kind.down(self.dropout(x), A), B)

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, s) when this adapter's output is exactly ``s·B A x̃`` added to the base output, x̃
        the layer input after this adapter's dropout (an additive method, its own forward), so the
        layer may run base and update as one autograd node (:mod:`lorakit.fused`); None otherwise.
        A method that overrides ``forward`` returns None unless it says otherwise."""
        if type(self).forward is not AdapterMethod.forward or not self.additive:
            return None
        A, B = self.factors()
        return A, B, 1.0

    def fused_update(self, base_layer: nn.Module) -> FusedUpdate | None:
        """This adapter's update for the one-node training path (:class:`lorakit.fused.FusedUpdate`),
        or None for the generic path. Called only on a base layer the path accepts. A method whose
        update carries per-feature vectors (VeRA) or an output scale (DoRA) hands them here, so the
        node keeps them apart from the factors; others hand :meth:`fused_factors`."""
        factors = self.fused_factors()
        p = self.fused_dropout()
        return None if factors is None or p is None else FusedUpdate(*factors, dropout=p)

    def dropout_in_effect(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout) and self.dropout.p > 0

    def fused_dropout(self) -> float | None:
        """The dropout p the one-node path applies for this adapter (0: none in effect), or None
        when it cannot stand in for ``self.dropout`` (another module, hooks on it)."""
        if not self.dropout_in_effect():
            return 0.0
        module = self.dropout
        hooked = module._forward_hooks or module._forward_pre_hooks
        return module.p if type(module) is nn.Dropout and not module.inplace and not hooked else None

    # -- the update as factors -----------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with the scaling folded in, so that the additive update is exactly B @ A."""
        raise NotImplementedError(f"method {self.method_name!r} has no low-rank factors")

    def output_scale(self, base_layer: nn.Module) -> torch.Tensor | None:
        """A per-output-feature factor on the whole output, bias excepted (DoRA's m / ||W + s·B A||):
        y = scale ⊙ (W x + B A x) + (1 − scale) ⊙ bias. None: 1 (additive methods)."""
        return None

    def delta_weight(self) -> torch.Tensor:
        """The additive update B @ A as an (out, in) float32 matrix (merging only)."""
        A, B = self.factors()
        return B.float() @ A.float()

    def exported_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, s·B), detached, whose product is the whole change from the original base weight."""
        A, B = self.factors()
        return A.detach(), B.detach()

    def take_combination(self, A: torch.Tensor, B_scaled: torch.Tensor,
                         inputs: list[tuple[AdapterMethod, float]]) -> None:
        """Become a combination of adapters (combine_adapters builds a new adapter of this method):
        its update is B_scaled @ A; ``inputs`` (adapter, weight) give what factors do not carry."""
        raise NotImplementedError(f"method {self.method_name!r} cannot hold a combination of adapters")

    # -- merging -------------------------------------------------------------------------------
    def merged_weight(self, W: torch.Tensor, forward_base: torch.Tensor | None = None) -> torch.Tensor:
        """W' from a float32 (out, in) W. Additive methods add delta_weight().

        ``forward_base`` is the weight the unmerged forward sees as the base layer's (W without
        adapters merged in the same call); only methods whose update depends on W (DoRA) use it,
        so that merging several adapters at once gives what running them unmerged gave.
        """
        self._refuse_unless_mergeable()
        return W + self.delta_weight()

    def unmerged_weight(self, W_merged: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`merged_weight` on float32 (out, in) values."""
        self._refuse_unless_mergeable()
        return W_merged - self.delta_weight()

    def _refuse_unless_mergeable(self) -> None:
        """For callers that reach the weight arithmetic without asking first (AdaptedLayer and
        AdaptedModel check every adapter before changing anything)."""
        if not self.mergeable:
            raise ConfigError(f"{self.display_name()} cannot be merged: {self.why_not_mergeable}; serve it unmerged")

    def weight_shift(self) -> torch.Tensor | None:
        """An (out, in) float32 change this adapter made to the base weight in memory (Delta-LoRA
        moves W while training), which removing the adapter takes back out; None when there is none."""
        return None

    def load_restores_all(self) -> bool:
        """True when a fresh load of this adapter's file builds it as it is now (hot swaps may then
        copy values into its tensors); False when it holds state a load starts without."""
        return True

    # -- files ---------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Name → tensor as the file holds it (the key in the file is ``base_model.model.<path>.<name>``).
        Default: its own parameters and persistent buffers under their attribute names."""
        own = dict(self.named_parameters(recurse=False))
        own.update((n, b) for n, b in self.named_buffers(recurse=False) if n not in self._non_persistent_buffers_set)
        return own

    def file_copies(self, tensors: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(own tensor, the file's value for it) for every tensor a load writes; ``tensors`` holds
        this module's entries by the names of :meth:`file_tensors`, checked against
        :meth:`expected_shapes`. The caller copies (after checking the whole file)."""
        return [(own, tensors[name].reshape(own.shape)) for name, own in self.file_tensors().items()]

    @classmethod
    def expected_shapes(cls, kind: LayerKind, config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor :meth:`file_tensors` writes for the module at ``path``.
        Default: the method built on the meta device (no memory, no values) without its shared
        state; a method whose ``create`` needs that state says its shapes itself."""
        with torch.device("meta"):
            method = cls.create(kind, config, path, None)
        return {name: tuple(t.shape) for name, t in method.file_tensors().items()}

    @classmethod
    def shared_file_tensors(cls, shared: nn.Module | None) -> dict[str, torch.Tensor]:
        """The shared state's tensors a file holds (key ``base_model.<name>``); none by default."""
        return {}

    @classmethod
    def shared_file_copies(
        cls, shared: nn.Module | None, tensors: Mapping[str, torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(own, tensors[name].reshape(own.shape)) for name, own in cls.shared_file_tensors(shared).items()]

    @classmethod
    def expected_shared_shapes(cls, config: AdapterConfig, kinds: Sequence[LayerKind]) -> dict[str, tuple[int, ...]]:
        return {}

    @classmethod
    def peft_config_fields(
        cls, config: AdapterConfig, modules: Mapping[str, AdapterMethod], per_module: PerModule
    ) -> dict[str, Any]:
        """This method's keys of ``adapter_config.json`` (lorakit writes the common ones: targets,
        modules_to_save, task type, ...). Default, for lorakit's own file types: AdapterConfig's
        names, with per-module ranks and alphas as exact patterns."""
        r, rank_pattern = per_module({p: config.rank_for(p) for p in modules})
        alpha, alpha_pattern = per_module({p: config.alpha_for(p) for p in modules})
        return {"r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                "dropout": config.dropout, "use_rslora": config.use_rslora,
                "options": dataclasses.asdict(config.options)}

    @classmethod
    def config_from_peft(cls, data: Mapping[str, Any], source: str) -> dict[str, Any]:
        """AdapterConfig keyword arguments (besides the common ones) from a file of this method's
        type; the inverse of :meth:`peft_config_fields`."""
        return {"method": cls.method_name, "alpha": float(data.get("alpha", 8.0)),
                "dropout": float(data.get("dropout", 0.0)), "use_rslora": bool(data.get("use_rslora", False)),
                "rank_pattern": {k: int(v) for k, v in (data.get("rank_pattern") or {}).items()},
                "alpha_pattern": {k: float(v) for k, v in (data.get("alpha_pattern") or {}).items()},
                "options": dict(data.get("options") or {})}

    # -- bookkeeping ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self.trainable]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, in={self.kind.in_features}, out={self.kind.out_features}"


def check_method_class(cls: type[AdapterMethod]) -> None:
    """A method class declares what the protocol needs; called when it is registered."""
    if not (isinstance(cls, type) and issubclass(cls, AdapterMethod)):
        raise TypeError(f"{cls!r} is not an AdapterMethod subclass")
    name = getattr(cls, "method_name", None)
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise TypeError(f"{cls.__name__}.method_name must be a non-empty name of letters, digits, '-' or '_'")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    if "default" not in cls.inits:
        raise TypeError(f"{cls.__name__}.inits must include 'default'")
    missing = [n for n in cls.up_tensors if n not in cls.trainable]
    if missing:
        raise TypeError(f"{cls.__name__}.up_tensors {missing} are not among its trainable tensors {cls.trainable}")
    without_factors = not _overrides(cls, "factors")
    if cls.mixable and without_factors:
        raise TypeError(f"{cls.__name__} is mixable but does not implement factors(); declare mixable = False "
                        "(its rows then run through its own forward in mixed batches)")
    if cls.combinable and without_factors and not _overrides(cls, "exported_factors"):
        raise TypeError(f"{cls.__name__} is combinable but implements neither factors() nor exported_factors()")
    if cls.mergeable and without_factors and not any(_overrides(cls, n) for n in ("delta_weight", "merged_weight")):
        raise TypeError(f"{cls.__name__} is mergeable but implements none of factors(), delta_weight(), "
                        "merged_weight(); declare mergeable = False")


def _overrides(cls: type[AdapterMethod], name: str) -> bool:
    return getattr(cls, name) is not getattr(AdapterMethod, name)
