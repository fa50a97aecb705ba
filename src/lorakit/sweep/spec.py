"""A sweep file: the base `lorakit train` settings, the search space, and how to search it.

::

    base:                  # TrainConfig fields, as `lorakit train --config` reads them
      model: default
      max_steps: 80
    search:                # see lorakit.sweep.space
      rank: [4, 8, 16]
      lr: {low: 3.0e-4, high: 3.0e-3, log: true}
    trials: 12             # --trials overrides it
    sampler: tpe           # tpe (seeded) | grid | {type: tpe, startup_trials: 4}
    seed: 0                # the sampler's seed
    pruner: median         # median | none | {type: median, startup_trials: 5, warmup_steps: 0}
                           #   | {type: threshold, lower: 0.6} (or upper: for perplexity)
    objectives: [metric]   # metric, forgetting, params: more than one makes a Pareto front

Everything is checked when the file is read, before a study exists. The checked spec is stored
in the study (as JSON), which is what `lorakit sweep --join` and a resumed sweep read back.
"""

from __future__ import annotations

import contextlib
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.sweep.space import FIELD_TYPES, SET_BY_SWEEP, Space, parse_space
from lorakit.train.config import TrainConfig, _with_guess

KEYS = ("base", "search", "trials", "sampler", "seed", "pruner", "objectives")
OBJECTIVES = ("metric", "forgetting", "params")
SAMPLERS = ("tpe", "grid")
PRUNERS = {"median": ("startup_trials", "warmup_steps"), "threshold": ("lower", "upper"), "none": ()}
DEFAULT_TRIALS = 10


@dataclass
class SweepSpec:
    base: dict[str, Any]
    search: dict[str, Any]  # as written; ``space`` is its checked form
    trials: int = DEFAULT_TRIALS
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe"})
    seed: int = 0
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    objectives: tuple[str, ...] = ("metric",)
    space: Space = field(init=False)
    notes: list[str] = field(default_factory=list)  # what the sweep changed from the file, said once

    def __post_init__(self) -> None:
        self.space = parse_space(self.search, self.base)

    @property
    def task(self) -> str:
        return self.base.get("task", TrainConfig.task)

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.task == "classify" else "perplexity"

    def directions(self) -> list[str]:
        """Optuna's direction of each objective: accuracy up; perplexity, forgetting and size down."""
        up = "maximize" if self.metric_name == "accuracy" else "minimize"
        return [up if name == "metric" else "minimize" for name in self.objectives]

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "search": self.search, "trials": self.trials, "sampler": self.sampler,
                "seed": self.seed, "pruner": self.pruner, "objectives": list(self.objectives)}

    def same_sweep(self, other: dict[str, Any]) -> list[str]:
        """The parts (other than trials) in which a stored sweep differs from this one."""
        mine = json.loads(json.dumps(self.to_dict()))
        return [key for key in KEYS if key != "trials" and mine.get(key) != other.get(key)]


def read_spec(path: str | Path, trials: int | None = None, objectives: str | None = None) -> SweepSpec:
    """A sweep file, checked; ``trials`` and ``objectives`` (the command's flags) override it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with base: and search:")
    if trials is not None:
        data["trials"] = trials
    if objectives is not None:
        data["objectives"] = objectives
    try:
        return spec_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def spec_from_dict(data: dict[str, Any]) -> SweepSpec:
    """A spec from a mapping (a sweep file, or one stored in a study), every part checked."""
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        guesses = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), KEYS, n=1, cutoff=0.6)
            guesses.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ConfigError(f"unknown sweep keys {', '.join(guesses)}; a sweep file has {', '.join(KEYS)}")
    if "search" not in data:
        raise ConfigError("no search: give the settings to try, e.g. search: {rank: [4, 8, 16]}")
    base = _base(data.get("base") or {})
    objectives = _objectives(data.get("objectives", ["metric"]), base)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be a whole number, got {seed!r}")
    spec = SweepSpec(base=base, search=data["search"], seed=seed, sampler=_sampler(data.get("sampler", "tpe")),
                     pruner=_pruner(data.get("pruner"), objectives), objectives=objectives)
    spec.trials = _trials(data.get("trials"), spec)
    return spec


def _base(base: Any) -> dict[str, Any]:
    if not isinstance(base, dict):
        raise ConfigError("base: expected a mapping of `lorakit train` settings")
    base = {str(k).replace("-", "_"): v for k, v in base.items()}
    unknown = sorted(set(base) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"base: unknown settings {', '.join(_with_guess(k, set(FIELD_TYPES)) for k in unknown)}; "
                          "see `lorakit train --help`")
    for name in ("out", "resume"):
        if name in base:
            raise ConfigError(f"base: drop {name}: {SET_BY_SWEEP[name]}")
    for name, value in base.items():  # YAML reads 1e-4 (no dot) as text
        if FIELD_TYPES[name].startswith("float") and isinstance(value, str):
            with contextlib.suppress(ValueError):  # else TrainConfig says what is wrong
                base[name] = float(value)
    try:
        TrainConfig(**base)
    except ConfigError as exc:
        raise ConfigError(f"base: {exc}") from None
    return base


def _objectives(given: Any, base: dict[str, Any]) -> tuple[str, ...]:
    names = [n.strip() for n in given.split(",")] if isinstance(given, str) else given
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"objectives: give a list of {', '.join(OBJECTIVES)}, got {given!r}")
    for name in names:
        if name not in OBJECTIVES:
            close = difflib.get_close_matches(name, OBJECTIVES, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"objectives: unknown objective {name!r}{hint}; choose from {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"objectives: {', '.join(names)} names one twice")
    if "metric" not in names:
        raise ConfigError("objectives: include metric (the run's accuracy or perplexity)")
    if "forgetting" in names and base.get("general_samples", TrainConfig.general_samples) == 0:
        raise ConfigError("objectives: forgetting is measured on general text; base: general_samples is 0 (off)")
    return tuple(names)


def _sampler(given: Any) -> dict[str, Any]:
    sampler = {"type": given} if isinstance(given, str) else given
    if not isinstance(sampler, dict) or sampler.get("type") not in SAMPLERS:
        raise ConfigError(f"sampler: choose {' or '.join(SAMPLERS)} (or {{type: tpe, startup_trials: 4}}), "
                          f"got {given!r}")
    extra = set(sampler) - {"type", "startup_trials"} if sampler["type"] == "tpe" else set(sampler) - {"type"}
    if extra:
        raise ConfigError(f"sampler: {sampler['type']} takes no {', '.join(sorted(extra))}")
    startup = sampler.get("startup_trials")
    if startup is not None and (isinstance(startup, bool) or not isinstance(startup, int) or startup < 0):
        raise ConfigError(f"sampler: startup_trials must be a whole number, 0 or more, got {startup!r}")
    return dict(sampler)


def _pruner(given: Any, objectives: tuple[str, ...]) -> dict[str, Any]:
    if given is None:
        return {"type": "median" if len(objectives) == 1 else "none"}
    pruner = {"type": given} if isinstance(given, str) else given
    if not isinstance(pruner, dict) or pruner.get("type") not in PRUNERS:
        raise ConfigError(f"pruner: choose {', '.join(PRUNERS)}, got {given!r}")
    allowed = PRUNERS[pruner["type"]]
    extra = sorted(set(pruner) - {"type", *allowed})
    if extra:
        raise ConfigError(f"pruner: {pruner['type']} takes {', '.join(allowed) or 'no options'}, not "
                          f"{', '.join(extra)}")
    for key in set(pruner) - {"type"}:
        value = pruner[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"pruner: {key} must be a number, got {value!r}")
    if pruner["type"] == "threshold" and not ({"lower", "upper"} & set(pruner)):
        raise ConfigError("pruner: threshold needs lower (accuracy) or upper (perplexity)")
    if pruner["type"] != "none" and len(objectives) > 1:
        raise ConfigError("pruner: pruning compares one objective during training; with several objectives "
                          "use pruner: none")
    return dict(pruner)


def _trials(given: Any, spec: SweepSpec) -> int:
    grid = spec.sampler["type"] == "grid"
    size = spec.space.grid_size() if grid else None  # a range without a step fails here
    if given is None:
        return size if size is not None else DEFAULT_TRIALS
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ConfigError(f"trials must be a whole number, at least 1, got {given!r}")
    if size is not None and given > size:
        spec.notes.append(f"the grid has {size} points: {size} trials, not {given}")
        return size
    return given
