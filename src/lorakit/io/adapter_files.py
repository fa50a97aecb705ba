"""Saving and loading adapters in HF PEFT's layout, checked before the model is touched.

This module is the public face of lorakit's files: reading a folder lives in
:mod:`lorakit.io.reading`, attaching a checked file to a model (loads, hot swaps) in
:mod:`lorakit.io.attaching`; both are re-exported here.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's tensor
names (``base_model.model.<path>.lora_A.weight``). lorakit's own facts (the method when PEFT
has no name for it, the base-weight fingerprint, the vocabulary size) travel in the
safetensors header metadata, which PEFT ignores.

Which tensors a module's adapter writes, and under which names, is its method's business
(``file_tensors`` / ``file_copies`` / ``expected_shapes``, :mod:`lorakit.methods.base`): LoRA
exports PiSSA / gradient-SVD offsets and Delta-LoRA shifts of W as the exact plain LoRA of rank
r + k that reproduces the trained model on the untouched base. A method PEFT lacks is saved in
the same layout under lorakit's own ``peft_type``; lorakit loads it back exactly, PEFT refuses it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.errors import AdapterFileError
from lorakit.io.adapter_checks import PREFIX, SHARED_PREFIX, check_against_model, vocab_size
from lorakit.io.atomic import write_atomically, write_text_atomically
from lorakit.io.attaching import (
    _copy_pairs,  # noqa: F401 (read by benchmarks/swap_read_paths.py)
    attach,
    replace_adapter,
)
from lorakit.io.peft_config import task_type_of, to_peft_dict
from lorakit.io.reading import (
    CONFIG_NAME,
    FORMAT_VERSION,
    RUN_ADAPTER,
    WEIGHTS_NAME,
    AdapterFile,
    adapter_folder,
    base_model_for,
    current_file,
    read_adapter,
    recorded_base_model,
)
from lorakit.kinds import Conv1DKind
from lorakit.methods import method_class
from lorakit.model import AdaptedModel
from lorakit.targets import plain_modules

log = logging.getLogger("lorakit")


def save_adapter(
    model: AdaptedModel, directory: str | Path, name: str = "default", base_model_name_or_path: str | None = None,
    *, extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write adapter ``name`` to ``directory`` in PEFT's layout (atomically, file by file).

    ``extra_metadata`` (JSON-able) joins lorakit's metadata, e.g. ``{"quantize": "nf4"}``.
    """
    config = model.configs.get(name)
    if config is None:
        model._require(name)
    cls = method_class(config.method)
    methods = model.adapter_modules(name)
    layers = model.layers_of(name)
    tensors: dict[str, torch.Tensor] = {}
    for path, method in methods.items():
        tensors.update({PREFIX + path + "." + k: v for k, v in method.file_tensors().items()})
    if methods:
        shared = cls.shared_file_tensors(model.shared_state_of(name))
        tensors.update({SHARED_PREFIX + k: v for k, v in shared.items()})
    saved_paths = []
    for path, saved in model.saved_modules().items():
        if name in saved.copies:
            saved_paths.append(path)
            for pname, value in saved.copies[name].state_dict().items():
                tensors[PREFIX + path + "." + pname] = value
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    peft = to_peft_dict(
        config, methods, saved_paths,
        uses_conv1d=any(isinstance(layer.kind, Conv1DKind) for layer in layers.values()),
        base_model_name_or_path=base_model_name_or_path, module_names=plain_modules(model.model),
        task_type=task_type_of(model.model),
    )
    metadata = {
        "format": "pt",
        "lorakit": json.dumps({
            **(extra_metadata or {}),  # lorakit's own keys below win
            "version": FORMAT_VERSION,
            "method": config.method,
            "config": config.to_json(),
            "fingerprints": {path: layer.fingerprint for path, layer in layers.items()},
            "vocab_size": vocab_size(model.model),
        }),
    }
    directory = Path(directory)
    write_atomically(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    write_text_atomically(directory / CONFIG_NAME, json.dumps(peft, indent=2, sort_keys=True) + "\n")
    if cls.peft_type is None:
        log.warning("saved adapter %r (%s) to %s with peft_type %s: PEFT has no such method, so PEFT's loader "
                    "refuses this folder; lorakit loads it (lorakit.load_adapter, lorakit serve)", name,
                    config.method, directory, cls.file_type())
    return directory


def load_adapter(
    model: nn.Module,
    directory: str | Path | AdapterFile,
    name: str = "default",
    *,
    trainable: bool = False,
    check_fingerprint: bool = True,
    activate: bool | None = None,
) -> AdaptedModel:
    """Load an adapter folder (lorakit's or PEFT's) onto ``model``; return the AdaptedModel.

    Every check runs before the model changes: keys, shapes, the base fingerprint and the
    vocabulary size. ``check_fingerprint=False`` loads onto a different base on purpose.
    ``directory`` may be what :func:`read_adapter` returned for it, read beforehand (a server
    reads and checks the file before taking the lock its batches hold).
    """
    adapter = current_file(directory)
    adapted = model if isinstance(model, AdaptedModel) else None
    if adapted is not None and name in adapted.configs:
        raise AdapterFileError(f"an adapter named {name!r} is already loaded; delete it or choose another name")
    root = adapted.model if adapted is not None else model
    plan = check_against_model(root, adapter, check_fingerprint, adapted.adapted_layers() if adapted else {})
    adapted = adapted or AdaptedModel(model)
    attach(adapted, name, adapter, plan, trainable=trainable, activate=activate)
    return adapted


__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "RUN_ADAPTER", "WEIGHTS_NAME", "AdapterFile", "adapter_folder",
           "base_model_for", "load_adapter", "read_adapter", "recorded_base_model", "replace_adapter", "save_adapter"]
