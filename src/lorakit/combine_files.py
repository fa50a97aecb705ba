"""``lorakit combine``: adapter folders in, one combined adapter folder out (PEFT layout).

The combination is evaluated as what ships: after saving, the written folder is loaded back
onto a fresh base and its outputs compared with the in-memory combination.
"""

from __future__ import annotations

from pathlib import Path

import torch

import lorakit
from lorakit.combine import Combination, combine_adapters
from lorakit.errors import ConfigError
from lorakit.merge_export import PROBE_TEXTS, load_base_for
from lorakit.methods import require_combinable
from lorakit.train.models import load_tokenizer, name_for_files, resolve_model_dir


def combine_folders(
    model_spec: str, adapter_dirs: list[str], weights: list[float], out: str | Path, *, kind: str = "linear",
    density: float = 0.5, rank: int | None = None, seed: int = 0,
) -> dict[str, float]:
    if len(adapter_dirs) != len(weights):
        raise ConfigError(f"give one weight per adapter: {len(adapter_dirs)} adapters, {len(weights)} weights")
    combination = Combination(kind, density=density, rank=rank, seed=seed)
    files = [lorakit.read_adapter(d) for d in adapter_dirs]  # every file checked before any model work
    for directory, file in zip(adapter_dirs, files, strict=True):
        require_combinable(str(directory), file.config.method)
    folder = resolve_model_dir(model_spec)
    if folder is None:
        raise ConfigError("lorakit combine needs a model folder (or 'default'), not a random architecture")
    model = None
    names = []
    for i, directory in enumerate(adapter_dirs):
        name = f"in{i}"
        base = model if model is not None else load_base_for(folder, files[0])
        model = lorakit.load_adapter(base, directory, name=name, activate=False)
        names.append(name)
    combine_adapters(model, names, weights, "combined", combination)
    lorakit.save_adapter(model, out, name="combined", base_model_name_or_path=name_for_files(model_spec))
    tokenizer = load_tokenizer(model_spec)
    probe = tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        model.set_active("combined")
        expected = _output(model(**probe))
        shipped = lorakit.load_adapter(load_base_for(folder, files[0]), out)
        got = _output(shipped(**probe))
    difference = (expected - got).abs().max().item()
    print(f"combined {len(adapter_dirs)} adapters ({kind}, weights {weights}) → {out}; "
          f"the saved folder reproduces the combination to {difference:.3g}")
    return {"max_difference": difference}


def _output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
