"""Reading an adapter folder: its two files parsed and checked on their own, before any model is involved.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's layout;
lorakit's own facts (the method when another one writes the same ``peft_type``, its options, the
base-weight fingerprint, the vocabulary size) travel in the safetensors header metadata, which
PEFT ignores. :func:`read_adapter` gives an :class:`AdapterFile`; attaching it to a model is
:mod:`lorakit.io.attaching`'s job.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.config import AdapterConfig
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.finite import first_non_finite
from lorakit.io.peft_config import from_peft_dict
from lorakit.io.safetensors_reader import SafetensorsError, file_identity, open_tensors
from lorakit.methods import METHODS, method_class

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
RUN_ADAPTER = "adapter"  # where `lorakit train` writes the adapter inside its run folder



def adapter_folder(directory: str | Path) -> Path:
    """The folder that holds the adapter files: ``directory`` itself, or, for the folder of a
    ``lorakit train`` run, its ``adapter`` subfolder. Users pass whichever they have at hand, so
    every command that takes an adapter accepts both."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() and (directory / RUN_ADAPTER / CONFIG_NAME).is_file():
        return directory / RUN_ADAPTER
    return directory


def recorded_base_model(directory: str | Path) -> str | None:
    """The base model an adapter says it was trained on, or None when it does not say.

    A ``lorakit train`` run folder's ``config.yaml`` holds the ``--model`` spec itself (random
    architectures included); an adapter folder has only ``base_model_name_or_path``, which
    PEFT and lorakit write (see ``train.models.name_for_files``).
    """
    directory = Path(directory)
    folder = adapter_folder(directory)
    run_config = directory / "config.yaml"
    if folder != directory and run_config.is_file():
        import yaml

        model = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("model")
        if model:
            return str(model)
    try:
        base = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):  # read_adapter gives the full story of a bad file
        return None
    return str(base) if base else None


def base_model_for(directory: str | Path, given: str | None) -> str:
    """The model spec to load an adapter onto: ``given`` (--model) when set, else the base the
    adapter records, when this machine has it (a folder, the embedded model, a random spec)."""
    from lorakit.errors import ConfigError
    from lorakit.train.models import loads_offline

    if given:
        return given
    recorded = recorded_base_model(directory)
    if recorded is None:
        raise ConfigError(f"give --model: {directory} does not record which base model it was trained on")
    if not loads_offline(recorded):
        raise ConfigError(f"give --model: {directory} was trained on {recorded!r}, which is not a model folder on "
                          "this machine (nor an embedded model)")
    return recorded


def _missing_adapter_message(directory: Path, path: Path) -> str:
    """Why ``directory`` is no adapter folder, with what to pass instead when it is a run folder."""
    if (directory / "summary.json").is_file() or (directory / "checkpoints").is_dir():
        if (directory / "model" / "config.json").is_file():
            return (f"{directory} is a `lorakit train` run of a whole-model baseline (--method full/head): it holds "
                    f"no adapter; its trained model is the folder {directory / 'model'}")
        return (f"{directory} is a `lorakit train` run folder without a finished adapter (no "
                f"{RUN_ADAPTER}/{CONFIG_NAME}); finish it with `lorakit train ... --resume`")
    return f"{path} does not exist; an adapter folder (or a `lorakit train` run folder) holds {CONFIG_NAME} and " \
           f"{WEIGHTS_NAME}"


@dataclass
class AdapterFile:
    """An adapter folder read into memory and checked on its own (not yet against a model)."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]  # views of the file's memory map: copy what you keep
    lorakit: dict[str, Any] | None  # lorakit's metadata; None for files written by other tools
    source: str
    identity: tuple[int, ...] | None = None  # the weights file's, when it was read (file_identity)

    def changed(self) -> bool:
        """True when the weights file was written or replaced since it was read: the tensors,
        views of it, may no longer hold the checked values."""
        return self.identity is not None and file_identity(Path(self.source) / WEIGHTS_NAME) != self.identity


def read_adapter(directory: str | Path) -> AdapterFile:
    """Read and parse both files and check the values for NaN/Inf; a truncated or corrupt file
    raises AdapterFileError. The tensors are views of the weights file (see safetensors_reader)."""
    directory = adapter_folder(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterFileError(_missing_adapter_message(directory, path))
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{config_path} is not valid JSON ({exc}); the file is corrupt or truncated") from exc
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{config_path} must hold a JSON object")
    try:
        mapped = open_tensors(weights_path)
    except (OSError, SafetensorsError) as exc:
        raise AdapterFileError(f"{weights_path} cannot be read ({exc}); the file is corrupt or truncated") from exc
    tensors, metadata = mapped.tensors, mapped.metadata
    try:
        lorakit = json.loads(metadata["lorakit"]) if "lorakit" in metadata else None
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{weights_path}: its lorakit metadata is not valid JSON ({exc})") from exc
    config = from_peft_dict(raw, str(config_path))
    if lorakit is not None:
        config = _restore_lorakit_fields(config, lorakit, str(weights_path))
    bad = first_non_finite(list(tensors.values()))
    if bad is not None:
        raise AdapterFileError(f"{weights_path}: tensor {list(tensors)[bad]} holds NaN or Inf values")
    return AdapterFile(config, tensors, lorakit, str(directory), mapped.identity)


def _restore_lorakit_fields(config: AdapterConfig, lorakit: dict[str, Any], source: str) -> AdapterConfig:
    """Bring back what PEFT's format cannot say: the method, when another one writes the same
    ``peft_type`` (LoRA-FA's frozen A is a plain LORA file), and the method's options."""
    saved = lorakit.get("config")
    saved = saved if isinstance(saved, dict) else {}
    changes: dict[str, Any] = {}
    recorded = METHODS.get(lorakit.get("method"))
    current = method_class(config.method)
    if recorded is not None and recorded is not current and recorded.file_type() == current.file_type() \
            and recorded.additive == current.additive:
        changes["method"] = recorded.method_name
    # Files written before methods had options hold none here (VeRA's seed and d_initial were, and
    # are, in its PEFT config as well).
    options = saved.get("options")
    if changes.get("method", config.method) == saved.get("method", lorakit.get("method")) \
            and isinstance(options, dict) and options != dataclasses.asdict(config.options):
        changes["options"] = options
    if not changes:
        return config
    try:
        return config.with_changes(**changes)
    except ConfigError as exc:
        raise AdapterFileError(f"{source}: its lorakit metadata does not fit its config: {exc}") from exc


def current_file(directory: str | Path | AdapterFile) -> AdapterFile:
    """The checked file: read now, or read before and still as it was (else read again)."""
    if not isinstance(directory, AdapterFile):
        return read_adapter(directory)
    return read_adapter(directory.source) if directory.changed() else directory
