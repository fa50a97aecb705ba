"""One Optuna study per sweep: where it is stored, how it is created, resumed and joined.

The study holds everything a worker needs: the checked sweep spec and the sweep folder are its
user attributes, so `lorakit sweep --join` needs only the storage. Samplers and pruners are not
stored (Optuna keeps them per process); every worker builds the same ones from the spec.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import ConfigError
from lorakit.sweep.spec import SweepSpec, spec_from_dict

SPEC_ATTR = "lorakit_sweep"  # the study's user attribute holding the spec (JSON)
OUT_ATTR = "lorakit_sweep_out"  # ... and the sweep folder it was started with
DEFAULT_STUDY = "lorakit-sweep"
STUDY_FILE = "study.db"


def optuna():
    """Optuna, or an error saying how to install it (it is an optional dependency)."""
    try:
        import optuna as module
    except ImportError:
        raise ConfigError("lorakit sweep needs Optuna: pip install 'lorakit[sweep]'") from None
    module.logging.set_verbosity(module.logging.WARNING)
    warnings.filterwarnings("ignore", category=module.exceptions.ExperimentalWarning)
    return module


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / STUDY_FILE).resolve()}"


def storage_for(target: str) -> str:
    """``--join``'s argument as a storage URL: a sweep folder (its study.db) or a URL."""
    if "://" in target:
        return target
    folder = Path(target)
    if (folder / STUDY_FILE).is_file():
        return default_storage(folder)
    raise ConfigError(f"--join {target}: no {STUDY_FILE} there; give the sweep folder of a SQLite sweep, or the "
                      "storage URL (e.g. postgresql://user@host/db) the sweep was started with")


def open_storage(url: str):
    """An RDB storage; SQLite waits for a busy database (several local workers write to it)."""
    module = optuna()
    engine: dict[str, Any] = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return module.storages.RDBStorage(with_driver(url), engine_kwargs=engine)
    except Exception as exc:  # a bad URL, an unreachable server, a missing driver
        raise ConfigError(f"cannot open the sweep storage {_shown(url)}: {type(exc).__name__}: {exc}") from None


def with_driver(url: str) -> str:
    """A postgresql:// URL with the driver that is installed: SQLAlchemy 2.1 reads it as psycopg
    (3), while many installs (and lorakit's test extra) have psycopg2."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2{sep}{rest}"
    return url


def _shown(url: str) -> str:
    """A URL without its password, for messages."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def create_or_resume(spec: SweepSpec, out: Path, url: str, name: str):
    """The sweep's study: created, or, when the storage holds it already, resumed (the same
    search; --trials may change)."""
    module = optuna()
    storage = open_storage(url)
    if name in module.study.get_all_study_names(storage):
        study = module.load_study(study_name=name, storage=storage)
        stored = json.loads(study.user_attrs.get(SPEC_ATTR, "{}"))
        differs = spec.same_sweep(stored)
        if differs:
            raise ConfigError(f"the storage already holds sweep {name!r} with another {', '.join(differs)}; to resume "
                              "it give the same sweep file (or use --join), else another --out or --study")
        if stored.get("trials") != spec.trials:
            study.set_user_attr(SPEC_ATTR, json.dumps(spec.to_dict()))
    else:
        if (out / "trials").is_dir() and any((out / "trials").iterdir()):
            raise ConfigError(f"{out}/trials holds runs of another sweep, but its study is not in "
                              f"{_shown(url)}; give another --out")
        study = module.create_study(storage=storage, study_name=name, directions=spec.directions())
        study.set_user_attr(SPEC_ATTR, json.dumps(spec.to_dict()))
        study.set_user_attr(OUT_ATTR, str(out.resolve()))
    return attach(study, spec)


def join(url: str, name: str | None):
    """A running sweep's study and its spec, from the storage alone."""
    module = optuna()
    storage = open_storage(url)
    names = module.study.get_all_study_names(storage)
    if name is None:
        if len(names) != 1:
            raise ConfigError(f"{_shown(url)} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                              "name one with --study")
        name = names[0]
    elif name not in names:
        raise ConfigError(f"{_shown(url)} holds no study {name!r} (it holds: {', '.join(names) or 'none'})")
    study = module.load_study(study_name=name, storage=storage)
    if SPEC_ATTR not in study.user_attrs:
        raise ConfigError(f"study {name!r} was not made by `lorakit sweep`: it holds no sweep config")
    spec = spec_from_dict(json.loads(study.user_attrs[SPEC_ATTR]))
    return attach(study, spec), spec, Path(study.user_attrs.get(OUT_ATTR, "."))


def attach(study, spec: SweepSpec):
    """The study with this process's sampler and pruner, built from the spec."""
    study.sampler = make_sampler(spec)
    study.pruner = make_pruner(spec)
    return study


def make_sampler(spec: SweepSpec):
    if spec.sampler["type"] == "grid":
        return grid_sampler(spec.space.grid(), spec.seed)
    startup = spec.sampler.get("startup_trials")
    if startup is None:  # Optuna's 10 random trials would be most of a cheap sweep
        startup = min(10, max(3, spec.trials // 3))
    return trial_seeded_tpe(spec.seed, startup)


def make_pruner(spec: SweepSpec):
    module = optuna()
    kind = spec.pruner["type"]
    if kind == "median":
        return module.pruners.MedianPruner(n_startup_trials=int(spec.pruner.get("startup_trials", 5)),
                                           n_warmup_steps=int(spec.pruner.get("warmup_steps", 0)))
    if kind == "threshold":
        return module.pruners.ThresholdPruner(lower=spec.pruner.get("lower"), upper=spec.pruner.get("upper"))
    return module.pruners.NopPruner()


def grid_sampler(grid: dict[str, list[Any]], seed: int):
    """Optuna's grid sampler, minus its stop() at the end of the grid: that works only inside
    study.optimize, and the sweep counts its trials itself."""
    module = optuna()

    class Grid(module.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Grid(grid, seed=seed)


def trial_seeded_tpe(seed: int, startup: int):
    """TPE whose random draws are seeded by (sweep seed, trial number).

    Every worker process builds its own sampler; with one plain seed, two workers would draw the
    same random start points. Seeding per trial keeps them apart, and keeps a one-worker sweep
    reproducible whatever process runs which trial."""
    module = optuna()

    class TrialSeededTPE(module.samplers.BaseSampler):
        def __init__(self) -> None:
            self._made: tuple[int, Any] | None = None

        def _for(self, trial):
            if self._made is None or self._made[0] != trial.number:
                trial_seed = int(np.random.SeedSequence([seed, trial.number]).generate_state(1)[0])
                self._made = (trial.number, module.samplers.TPESampler(seed=trial_seed, n_startup_trials=startup,
                                                                       constant_liar=True))
            return self._made[1]

        def infer_relative_search_space(self, study, trial):
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial) -> None:
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values) -> None:
            self._for(trial).after_trial(study, trial, state, values)

    return TrialSeededTPE()
