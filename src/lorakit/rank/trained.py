"""After training: the spectrum of every trained update ΔW = s·B·A, from its factors.

The adapter is loaded onto its base (the one it records, or --model) as every other command
loads it, and each module's update is read through its method's ``exported_factors()``: the
whole change from the original base weight (LoRA's PiSSA / gradient-SVD offset and Delta-LoRA
shift included), for any method whose update is B·A. Methods whose update is not such a
product (``combinable`` False) have no spectrum to read and are refused before the base loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.io.adapter_files import AdapterFile, base_model_for
from lorakit.methods import method_class
from lorakit.model import AdaptedModel
from lorakit.rank.spectra import Spectrum, factor_spectrum

NAME = "trained"  # the adapter's name on the loaded model


@dataclass
class LoadedAdapter:
    model: AdaptedModel
    file: AdapterFile
    model_spec: str
    folder: Path  # the folder holding the adapter files


@dataclass
class TrainedModule:
    spectrum: Spectrum
    rank: int  # the adapter's rank on this module (its config's r after rank_pattern)
    factor_rank: int  # rows of the exported A: r, or r + k with an offset or shift folded in
    scaling: float


def require_factors(adapter: str, file: AdapterFile, *, shrinking: bool) -> None:
    """A clear error for an adapter whose update is not B·A (or, to shrink, not W + B·A)."""
    from lorakit.methods import METHODS

    cls = method_class(file.config.method)
    readable = ", ".join(n for n, c in METHODS.items() if c.combinable)
    if not cls.combinable:
        raise ConfigError(f"adapter {adapter} ({cls.display_name()}) has no update of the form ΔW = B·A, so it has "
                          f"no rank spectrum to report or shrink; `lorakit rank --adapter` reads methods whose "
                          f"update is B·A ({readable})")
    if shrinking and not cls.additive:
        additive = ", ".join(n for n, c in METHODS.items() if c.combinable and c.additive)
        raise ConfigError(f"adapter {adapter} ({cls.display_name()}) changes the base by more than W + B·A, so a "
                          f"plain LoRA of its truncated B·A would not reproduce it; --shrink and --shrink-rank take "
                          f"methods whose update is W + B·A ({additive}); without them `lorakit rank --adapter` "
                          "still reports its spectra")


def load_trained(adapter: str, model_spec: str | None, *, shrinking: bool) -> LoadedAdapter:
    """The adapter's base with the adapter loaded (checked before the base is read)."""
    from lorakit.io.reading import adapter_folder

    file = lorakit.read_adapter(adapter)
    require_factors(adapter, file, shrinking=shrinking)
    spec = base_model_for(adapter, model_spec)
    base = load_base(spec, file, adapter)
    model = lorakit.load_adapter(base.eval(), file, name=NAME)
    return LoadedAdapter(model, file, spec, adapter_folder(adapter))


def load_base(spec: str, file: AdapterFile, adapter: str) -> torch.nn.Module:
    """The base the adapter was trained on: its class (classifier head or causal LM) from the file,
    a ``random:`` base drawn with the training run's seed."""
    from lorakit.generate import _base_seed
    from lorakit.merge_export import head_labels, load_base_for
    from lorakit.train.models import load_model, resolve_model_dir

    folder = resolve_model_dir(spec)
    if folder is None:
        task = (file.lorakit or {}).get("task") or ("classify" if head_labels(file) else "causal-lm")
        return load_model(spec, task, num_labels=head_labels(file), seed=_base_seed(adapter))
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialized": the adapter brings the trained head
    try:
        return load_base_for(folder, file)
    finally:
        hf_logging.set_verbosity(verbosity)


def trained_modules(model: AdaptedModel, name: str = NAME) -> dict[str, TrainedModule]:
    """Every module's update spectrum, exact, from its exported factors."""
    config = model.configs[name]
    found = {}
    for path, method in model.adapter_modules(name).items():
        A, B_scaled = method.exported_factors()
        found[path] = TrainedModule(factor_spectrum(A, B_scaled), config.rank_for(path), A.shape[0],
                                    float(method.scaling))
    return found
