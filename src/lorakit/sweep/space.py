"""The ``search:`` part of a sweep file: which `lorakit train` settings a sweep tries, and how.

Every setting is checked before the first trial: an unknown name (with a guess at the one
meant), an empty list of choices, a range whose low is not below its high, and each choice or
bound against TrainConfig's own validation, so a typo costs seconds, not a failed trial an hour in.

Three entries are not TrainConfig fields: ``alpha_over_rank`` (alpha = rank × value, so the
update's scale stays put while the rank moves), ``data_mix`` (a weight per source, normalised
into ``--data a.jsonl:w,b.jsonl:w``) and ``targets`` as named sets.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig, _with_guess
from lorakit.train.data import DataError, parse_mix

ALPHA_OVER_RANK = "alpha_over_rank"
DATA_MIX = "data_mix"
MIX_PREFIX = "data_mix:"  # a mix source's weight is the parameter "data_mix:<path>"
SET_BY_SWEEP = {"out": "each trial's run folder is DIR/trials/<number>", "resume": "a sweep resumes its trials itself",
                "quiet": "trials run quietly; the sweep prints one line per trial",
                "threads": "give --threads to `lorakit sweep` (default: cores ÷ workers)",
                "log": "set it in base:"}
RANGE_KEYS = ("low", "high", "log", "step")
FIELD_TYPES = {f.name: str(f.type) for f in fields(TrainConfig)}


@dataclass(frozen=True)
class Choice:
    """A categorical setting. ``labels`` are what Optuna records (plain values), ``values`` what
    each stands for in the TrainConfig (a named target set's module list)."""

    name: str
    labels: tuple[Any, ...]
    values: tuple[Any, ...]

    def suggest(self, trial) -> Any:
        return trial.suggest_categorical(self.name, list(self.labels))

    def value(self, label: Any) -> Any:
        return self.values[self.labels.index(label)]

    def grid(self) -> list[Any]:
        return list(self.labels)


@dataclass(frozen=True)
class Range:
    """A numeric setting drawn between ``low`` and ``high`` (inclusive), on a log scale when asked."""

    name: str
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def suggest(self, trial) -> Any:
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def value(self, label: Any) -> Any:
        return label

    def grid(self) -> list[Any]:
        if self.step is None:
            raise ConfigError(f"sampler: grid tries listed values; search: {self.name} is a range without a step: "
                              "give a list of choices or a step")
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        points = [self.low + i * self.step for i in range(count)]
        return [int(p) for p in points] if self.integer else [round(p, 12) for p in points]


Param = Choice | Range


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's parameters as Optuna records them (in the file's order)."""
        return {p.name: p.suggest(trial) for p in self.params}

    def settings(self, params: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        """The TrainConfig fields a trial's parameters set (over ``base``)."""
        by_name = {p.name: p for p in self.params}
        settings: dict[str, Any] = {}
        weights: dict[str, float] = {}
        for name, label in params.items():
            if name.startswith(MIX_PREFIX):
                weights[name[len(MIX_PREFIX):]] = float(label)
            elif name != ALPHA_OVER_RANK:
                settings[name] = by_name[name].value(label) if name in by_name else label
        if ALPHA_OVER_RANK in params:
            rank = settings.get("rank", base.get("rank", TrainConfig.rank))
            settings["alpha"] = float(rank * params[ALPHA_OVER_RANK])
        if weights:
            total = sum(weights.values())
            settings["data"] = ",".join(f"{path}:{weight / total:.4g}" for path, weight in weights.items())
        return settings

    def grid(self) -> dict[str, list[Any]]:
        return {p.name: p.grid() for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(values) for values in self.grid().values())


def searchable() -> list[str]:
    return sorted(set(FIELD_TYPES) - set(SET_BY_SWEEP) | {ALPHA_OVER_RANK, DATA_MIX})


def parse_space(search: Any, base: dict[str, Any]) -> Space:
    """``search:`` as a :class:`Space`, every entry checked (``base`` is the checked base mapping)."""
    if not isinstance(search, dict) or not search:
        raise ConfigError("search: give a mapping of settings to try, e.g. rank: [4, 8, 16]")
    search = {str(k).replace("-", "_"): v for k, v in search.items()}
    unknown = [k for k in search if k not in FIELD_TYPES and k not in (ALPHA_OVER_RANK, DATA_MIX)]
    if unknown:
        known = set(searchable())
        raise ConfigError(f"search: unknown settings {', '.join(_with_guess(k, known) for k in unknown)}; "
                          "see `lorakit train --help`")
    for name in search:
        if name in SET_BY_SWEEP:
            raise ConfigError(f"search: {name} cannot be searched: {SET_BY_SWEEP[name]}")
    if ALPHA_OVER_RANK in search and "alpha" in search:
        raise ConfigError("search: give alpha or alpha_over_rank (alpha = rank × value), not both")
    if DATA_MIX in search and "data" in search:
        raise ConfigError("search: give data or data_mix, not both")
    params: list[Param] = []
    for name, given in search.items():
        if name == DATA_MIX:
            params += _mix(given)
        elif name == ALPHA_OVER_RANK:
            param = _param(name, given, "float")
            _positive(param, "alpha_over_rank")
            params.append(param)
        elif name == "targets":
            params.append(_targets(given))
        else:
            param = _param(name, given, FIELD_TYPES[name])
            _check_against_config(param, base)
            params.append(param)
    return Space(tuple(params))


def _param(name: str, given: Any, kind: str) -> Param:
    if isinstance(given, list):
        if not given:
            raise ConfigError(f"search: {name}: the list of choices is empty; give at least one")
        labels = []
        for item in given:
            if isinstance(item, (list, dict)):
                raise ConfigError(f"search: {name}: each choice must be a single value, got {item!r}")
            labels.append(_number(item, kind, name))
        return Choice(name, tuple(labels), tuple(labels))
    if isinstance(given, dict):
        return _range(name, given, kind)
    raise ConfigError(f"search: {name}: give a list of choices ([4, 8, 16]) or a range ({{low: 1e-4, high: 3e-3, "
                      f"log: true}}); a fixed value belongs in base:")


def _number(value: Any, kind: str, name: str) -> Any:
    """YAML reads 1e-4 (no dot) as text: a float setting takes it as the number it means."""
    if kind.startswith("float") and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"search: {name}: {value!r} is not a number") from None
    return value


def _range(name: str, given: dict[str, Any], kind: str) -> Range:
    unknown = [k for k in given if k not in RANGE_KEYS]
    if unknown:
        guesses = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), RANGE_KEYS, n=1, cutoff=0.5)
            guesses.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ConfigError(f"search: {name}: unknown range keys {', '.join(guesses)}; a range takes "
                          f"{', '.join(RANGE_KEYS)}")
    if "low" not in given or "high" not in given:
        raise ConfigError(f"search: {name}: a range needs both low and high")
    integer = kind.startswith("int")
    if not (integer or kind.startswith("float")):
        raise ConfigError(f"search: {name} is not a number; give a list of choices")
    low, high, step = (_bound(given.get(k), k, name, integer) for k in ("low", "high", "step"))
    log = given.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"search: {name}: log must be true or false, got {log!r}")
    if low >= high:
        raise ConfigError(f"search: {name}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ConfigError(f"search: {name}: a log range needs low above 0, got {low}")
    if log and step is not None:
        raise ConfigError(f"search: {name}: give log or step, not both")
    if step is not None and step <= 0:
        raise ConfigError(f"search: {name}: step must be above 0, got {step}")
    return Range(name, low, high, log, step, integer)


def _bound(value: Any, key: str, name: str, integer: bool) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"search: {name}: {key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"search: {name}: {key} must be a number, got {value!r}")
    if integer:
        if value != int(value):
            raise ConfigError(f"search: {name} is a whole number; {key} must be one, got {value}")
        return int(value)
    return float(value)


def _targets(given: Any) -> Choice:
    """Target sets: a list of sets (each 'query,value', [query, value] or all-linear), or a mapping
    of names to sets, tried by name. (Unquoted, YAML reads [query,value, all-linear] as three sets.)"""
    if isinstance(given, dict):
        items = list(given.items())
    elif isinstance(given, list):
        items = [(None, item) for item in given]
    else:
        raise ConfigError("search: targets: give a list of target sets, e.g. ['query,value', all-linear], or a "
                          "mapping of names to sets, e.g. {qv: 'query,value', all: all-linear}")
    if not items:
        raise ConfigError("search: targets: the list of choices is empty; give at least one")
    labels, values = [], []
    for label, spec in items:
        if isinstance(spec, list) and spec and all(isinstance(s, str) for s in spec):
            spec = ",".join(spec)
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"search: targets: {spec!r} is not a target set (module names, a regex, or all-linear)")
        labels.append(str(label) if label is not None else spec)
        values.append(spec)
    return Choice("targets", tuple(labels), tuple(values))


def _mix(given: Any) -> list[Param]:
    if not isinstance(given, dict) or not given:
        raise ConfigError("search: data_mix: give a weight per source, e.g. {a.jsonl: {low: 0.2, high: 0.8}, "
                          "b.jsonl: 0.5}")
    params: list[Param] = []
    for path, weight in given.items():
        name = f"{MIX_PREFIX}{path}"
        fixed = not isinstance(weight, (list, dict))  # a fixed weight: one choice
        param = _param(name, [weight] if fixed else weight, "float")
        _positive(param, f"data_mix: {path}")
        params.append(param)
    missing = [str(path) for path in given if not Path(str(path)).is_file()]
    if missing:
        raise ConfigError(f"search: data_mix: {', '.join(missing)} does not exist" if len(missing) == 1 else
                          f"search: data_mix: {', '.join(missing)} do not exist")
    try:
        parse_mix(",".join(f"{path}:1" for path in given))  # as `lorakit train --data` will read it
    except DataError as exc:
        raise ConfigError(f"search: data_mix: {exc}") from None
    return params


def _positive(param: Param, what: str) -> None:
    values = [param.low, param.high] if isinstance(param, Range) else list(param.values)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"search: {what}: values must be positive numbers, got {value!r}")


def _check_against_config(param: Param, base: dict[str, Any]) -> None:
    """Each choice (or both bounds) through TrainConfig's own checks, with the base around it."""
    values = [param.low, param.high] if isinstance(param, Range) else list(param.values)
    for value in values:
        try:
            TrainConfig(**{**base, param.name: value})
        except ConfigError as exc:
            raise ConfigError(f"search: {param.name}: {value!r}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"search: {param.name}: {value!r} does not fit this setting ({exc})") from None
