"""Adapter configuration: only what rebuilds an adapter's forward pass.

Training settings (learning rates, LoRA+ ratio, Delta-LoRA's schedule) live beside the
optimizer in :mod:`lorakit.training_rules`, not here, so that a saved adapter config says
exactly what a loader needs and nothing else.

The fields every method shares live here; a method's own settings travel in ``options``, checked
and filled in by the method's ``Options`` dataclass (:mod:`lorakit.methods.base`):
``AdapterConfig(method="vera", options={"projection_seed": 7, "d_initial": 0.1})``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from typing import Any

from lorakit.errors import ConfigError
from lorakit.methods import method_class

INITS = ("default", "gaussian", "pissa", "gradient-svd")  # the built-in inits; each method lists those it supports
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class AdapterConfig:
    """Where an adapter goes and how it is parametrised.

    ``target_modules`` is a list of module names (an exact path or a dotted suffix), a
    regular expression (matched against the full path), or ``"all-linear"``. ``rank_pattern``
    and ``alpha_pattern`` map a module-name pattern (suffix or regex, PEFT's rule) to a
    per-module rank or alpha.
    """

    method: str = "lora"  # a registered method (lorakit.methods.METHODS)
    r: int = 8  # rank
    alpha: float = 8.0  # scale numerator: s = alpha / r (or alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter input; 0 costs nothing
    use_rslora: bool = False  # rank-stabilised scaling (Kalajdzievski 2023)
    init: str = "default"  # default | gaussian | pissa | gradient-svd
    target_modules: tuple[str, ...] | str = ("query", "value", "q_proj", "v_proj", "c_attn")
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: str | None = None  # e.g. "layers"; guessed from common names when None
    modules_to_save: tuple[str, ...] = ()  # trainable full copies (e.g. a classifier head)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    options: Any = None  # the method's own options: a mapping (or its Options dataclass); stored as the latter
    # Older spellings of VeRA's options (projection_seed, d_initial); folded into ``options`` and
    # then None. Other methods ignore them, as they always did.
    vera_seed: int | None = field(default=None, repr=False, compare=False)
    vera_d_initial: float | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        cls = method_class(self.method)
        options = self.options
        if self.method == "vera" and (self.vera_seed is not None or self.vera_d_initial is not None):
            options = dict(_as_mapping(options))
            if self.vera_seed is not None:
                options["projection_seed"] = self.vera_seed
            if self.vera_d_initial is not None:
                options["d_initial"] = self.vera_d_initial
        object.__setattr__(self, "options", cls.options_from(options))
        object.__setattr__(self, "vera_seed", None)
        object.__setattr__(self, "vera_d_initial", None)
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        cls.check_config(self)
        # Normalise list-like fields to tuples so the config stays hashable and frozen.
        object.__setattr__(self, "target_modules", _tuple_or_str(self.target_modules, "target_modules"))
        if self.exclude_modules is not None:
            object.__setattr__(self, "exclude_modules", _tuple_or_str(self.exclude_modules, "exclude_modules"))
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            object.__setattr__(
                self, "layers_to_transform", (layers,) if isinstance(layers, int) else tuple(layers)
            )
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        for pattern in [*self.rank_pattern, *self.alpha_pattern]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"rank/alpha pattern {pattern!r} is not a valid regex: {exc}") from exc
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank < 1:
                raise ConfigError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")

    def rank_for(self, module_name: str) -> int:
        """The rank of one module, after ``rank_pattern``."""
        key = match_pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """The alpha of one module, after ``alpha_pattern``."""
        key = match_pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def scaling_for(self, module_name: str) -> float:
        """The method's scaling of one module: alpha / r, or alpha / sqrt(r) with rsLoRA (VeRA: 1)."""
        return method_class(self.method).scaling_for(self, module_name)

    def to_json(self) -> dict[str, Any]:
        """The config as JSON values (lorakit's file metadata); ``AdapterConfig(**to_json())`` rebuilds it."""
        data = asdict(self)
        del data["vera_seed"], data["vera_d_initial"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def with_changes(self, **changes: Any) -> AdapterConfig:
        return replace(self, **changes)


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def alpha_for(scaling: float, r: int, use_rslora: bool) -> float:
    """The alpha that gives ``scaling`` at rank ``r`` (the inverse of :func:`scaling`)."""
    return scaling * (math.sqrt(r) if use_rslora else r)


def exact_pattern(path: str) -> str:
    """A rank/alpha pattern key that matches the module ``path`` and no module it is a suffix of."""
    return "^" + re.escape(path)


def match_pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule for rank/alpha patterns: the first key that matches a dotted suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _as_mapping(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if is_dataclass(options) and not isinstance(options, type):
        return asdict(options)
    return dict(options)


def _tuple_or_str(value: Any, what: str) -> tuple[str, ...] | str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
        if not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{what} must hold strings, got {value!r}")
        return items
    raise ConfigError(f"{what} must be a list of names, a regex string or 'all-linear', got {value!r}")
