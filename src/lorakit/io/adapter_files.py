"""Saving and loading adapters in HF PEFT's layout, checked before the model is touched.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.config import AdapterConfig
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.finite import first_non_finite
from lorakit.io.adapter_checks import PREFIX, SHARED_PREFIX, Plan, check_against_model, vocab_size
from lorakit.io.atomic import write_atomically, write_text_atomically
from lorakit.io.peft_config import from_peft_dict, task_type_of, to_peft_dict
from lorakit.io.safetensors_reader import SafetensorsError, file_identity, open_tensors
from lorakit.kinds import Conv1DKind
from lorakit.methods import METHODS, method_class
from lorakit.methods.base import values_filled_by_caller
from lorakit.model import AdaptedModel
from lorakit.targets import plain_modules

log = logging.getLogger("lorakit")

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
                          "this machine (nor the embedded default)")
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


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
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
    if config.method == saved.get("method", lorakit.get("method")):
        if isinstance(saved.get("options"), dict):
            changes["options"] = saved["options"]
        elif "vera_seed" in saved:  # files written before options existed
            changes["vera_seed"] = saved["vera_seed"]
    if not changes:
        return config
    try:
        return config.with_changes(**changes)
    except ConfigError as exc:
        raise AdapterFileError(f"{source}: its lorakit metadata does not fit its config: {exc}") from exc


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
    adapter = _current(directory)
    adapted = model if isinstance(model, AdaptedModel) else None
    if adapted is not None and name in adapted.configs:
        raise AdapterFileError(f"an adapter named {name!r} is already loaded; delete it or choose another name")
    root = adapted.model if adapted is not None else model
    plan = check_against_model(root, adapter, check_fingerprint, adapted.adapted_layers() if adapted else {})
    adapted = adapted or AdaptedModel(model)
    _attach(adapted, name, adapter, plan, trainable=trainable, activate=activate)
    return adapted


def replace_adapter(
    model: AdaptedModel, name: str, directory: str | Path | AdapterFile, *, trainable: bool = False,
    check_fingerprint: bool = True,
) -> None:
    """Hot swap: the adapter in ``directory`` takes the place of adapter ``name`` for the next forward.

    The file is read, its values checked for NaN/Inf and the adapter checked against the model
    (keys, shapes, fingerprint, vocabulary) before anything changes, so a bad file leaves the
    served set as it was. When the new adapter has the old one's structure (equal config, every
    tensor of the same shape and of the dtype a load gives it, nothing merged, no PiSSA offset or
    Delta-LoRA shift: a retrained version of a served adapter), its values are copied into the old
    adapter's tensors.
    That builds no modules and allocates nothing, which is most of what a load costs (about 150 µs
    of Python per module and fresh pages for every byte). Otherwise the new adapter is loaded
    beside the old one, which is then deleted and its name taken. Either way the adapter keeps its
    place among the active ones, and it is frozen afterwards if it was frozen before or
    ``trainable`` is False (as with :func:`load_adapter`, loads are for inference unless asked).
    The values are read from the file until the copy ends: a copy interrupted, or a file written
    meanwhile, removes the adapter rather than serve a mixture of values. ``directory`` may be
    what :func:`read_adapter` returned for it, as with :func:`load_adapter`.
    """
    model._require(name)
    adapter = _current(directory)
    plan = check_against_model(model.model, adapter, check_fingerprint, model.adapted_layers())
    frozen = name in model.frozen or not trainable
    pairs = _in_place_pairs(model, name, adapter, plan)
    if pairs is not None:
        try:
            _copy_tensors(pairs)
            _require_unchanged(adapter)
        except BaseException:
            # Every check passed, so only an interruption or a file written during the copy gets
            # here: the adapter holds a mixture of values, and serving that would be worse than
            # not serving it.
            model.delete_adapter(name)
            raise
        model.configs[name] = adapter.config
        if frozen != (name in model.frozen):  # the same tensors: their requires_grad is already right
            model.freeze_adapter(name, frozen)
        log.info("replaced adapter %r in place from %s: %d tensors", name, adapter.source, len(pairs))
        return
    active = model.active
    incoming = f"{name}__incoming"
    while incoming in model.configs:
        incoming += "_"
    _attach(model, incoming, adapter, plan, trainable=True, activate=False)
    model.delete_adapter(name)
    model.rename_adapter(incoming, name)
    model.freeze_adapter(name, frozen)
    if name in active:
        model.set_active(*active)


def _current(directory: str | Path | AdapterFile) -> AdapterFile:
    """The checked file: read now, or read before and still as it was (else read again)."""
    if not isinstance(directory, AdapterFile):
        return read_adapter(directory)
    return read_adapter(directory.source) if directory.changed() else directory


def _attach(
    adapted: AdaptedModel, name: str, adapter: AdapterFile, plan: Plan, *, trainable: bool, activate: bool | None
) -> None:
    """Build adapter ``name`` for a checked file and fill it with the file's values."""
    with values_filled_by_caller():  # _copy_tensors fills every tensor the file holds
        adapted.add_adapter(name, adapter.config, activate=activate, every_target=False)
    try:
        _copy_tensors(_copy_pairs(adapted, name, adapter))
        _require_unchanged(adapter)
    except Exception:
        adapted.delete_adapter(name)
        raise
    if not trainable:
        adapted.freeze_adapter(name)
    log.info("loaded adapter %r from %s: %d tensors onto %d modules", name, adapter.source,
             len(adapter.tensors), len(plan.targets))


def _copy_pairs(adapted: AdaptedModel, name: str, adapter: AdapterFile) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(a tensor adapter ``name`` holds, the file's value for it) for every tensor a load writes:
    the one place that maps the file's keys to the adapter's tensors (loads and hot swaps)."""
    tensors = adapter.tensors
    methods = adapted.adapter_modules(name)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for path, method in methods.items():
        pairs += method.file_copies(_Under(tensors, PREFIX + path + "."))
    if methods:
        cls = method_class(adapter.config.method)
        pairs += cls.shared_file_copies(adapted.shared_state_of(name), _Under(tensors, SHARED_PREFIX))
    for path, saved in adapted.saved_modules().items():
        if name in saved.copies:
            prefix = PREFIX + path + "."
            pairs += [(value, tensors[prefix + pname])
                      for pname, value in saved.copies[name].state_dict(keep_vars=True).items()]
    return pairs


def _in_place_pairs(
    model: AdaptedModel, name: str, adapter: AdapterFile, plan: Plan
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The copies that turn adapter ``name`` into the checked file's adapter without building
    anything, or None when the file's adapter is built differently.

    In place must end with the values a fresh load would give: the same config (so the same
    modules, ranks and scalings), no merged copy in the base weight to keep in step, no PiSSA
    offset or Delta-LoRA shift (a load starts without them), and every tensor already of the
    file's shape and of the dtype a load gives it: torch's default dtype for the method's
    tensors, the base module's for a trainable copy. A bf16 file then goes in place into float32
    tensors, converted by the copy exactly as a load converts it. The served tensors keep their
    device (a load copies to the adapter's device too).
    """
    if model.configs[name] != adapter.config:
        return None
    layers = model.layers_of(name)
    saved = {path: module for path, module in model.saved_modules().items() if name in module.copies}
    if sorted(layers) != sorted(plan.targets) or sorted(saved) != sorted(plan.saved):
        return None
    for layer in layers.values():
        if name in layer.merged or not layer.adapters[name].load_restores_all():
            return None
    loaded_dtype = {id(copy): original.dtype for module in saved.values()  # a load deep-copies the original
                    for copy, original in zip(module.copies[name].state_dict(keep_vars=True).values(),
                                              module.original.state_dict(keep_vars=True).values(), strict=True)}
    default = torch.get_default_dtype()
    pairs = _copy_pairs(model, name, adapter)
    if any(dst.shape != src.shape or dst.dtype != loaded_dtype.get(id(dst), default) for dst, src in pairs):
        return None
    return pairs


class _Under(Mapping):
    """The file's tensors whose keys start with ``prefix``, by the rest of the key (no copy of the dict)."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        self.tensors, self.prefix = tensors, prefix

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[self.prefix + name]

    def __iter__(self):
        n = len(self.prefix)
        return (k[n:] for k in self.tensors if k.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@torch.no_grad()
def _copy_tensors(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each file value into its tensor.

    Copies, never ``param.data = value``: the file's tensors are views of a memory map of it
    (safetensors_reader), and a parameter left on it dies with SIGBUS when the file is later rewritten in place
    (PEFT's save_pretrained truncates and rewrites), taking a server down with it. ``copy_``
    also bumps each tensor's version, which DoRA's norm cache and mixed-batch stacks watch.
    """
    for dst, src in pairs:
        dst.copy_(src)


def _require_unchanged(adapter: AdapterFile) -> None:
    """The file's tensors were read through its memory map until now: a write to the file since
    it was read and checked may have put unchecked values (NaN, another version's) in the copy."""
    if adapter.changed():
        raise AdapterFileError(
            f"{Path(adapter.source) / WEIGHTS_NAME} was written while it was being loaded, so the copied values may "
            "mix two versions of it (or unchecked NaN/Inf); the adapter was not kept. Load it again once it is "
            "written; writing to a new file and renaming it into place avoids this."
        )


__all__ = ["AdapterFile", "base_model_for", "load_adapter", "read_adapter", "recorded_base_model", "replace_adapter",
           "save_adapter"]
