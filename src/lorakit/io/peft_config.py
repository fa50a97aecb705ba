"""Mapping between lorakit's AdapterConfig and HF PEFT's ``adapter_config.json``.

The keys every adapter has (targets, modules_to_save, task type, ...) are written here; each
method writes and reads its own (``peft_config_fields`` / ``config_from_peft``), and
``peft_type`` says which method reads a file (a method PEFT lacks writes lorakit's own type,
``LORAKIT_<NAME>``, which PEFT refuses). Policy for keys neither knows: a key left at its default
value is ignored with a note; any other value is an error, because ignoring it would change the
result (a config written by a newer tool must not load as something else).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from lorakit.config import AdapterConfig
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.methods import METHODS, method_class, method_for_file_type
from lorakit.methods.base import AdapterMethod

log = logging.getLogger("lorakit")

# Keys that describe where a file came from, not what it computes.
INFORMATIONAL = frozenset({
    "peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping",
    "peft_version", "fan_in_fan_out", "init_lora_weights", "init_weights",
})
# Keys of every adapter, whatever its method.
COMMON_FIELDS = frozenset({"target_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "bias"})
# PEFT options whose default is not falsy; at these values they change nothing.
NEUTRAL_VALUES: dict[str, Any] = {"megatron_core": "megatron.core", "qalora_group_size": 16}


def to_peft_dict(
    config: AdapterConfig,
    modules: Mapping[str, AdapterMethod],
    saved_paths: list[str],
    uses_conv1d: bool,
    base_model_name_or_path: str | None,
    module_names: Iterable[str] = (),
    task_type: str | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter whose method instances are ``modules`` (by path).

    Targets are written as exact module paths: PEFT's own "all-linear" rule differs from
    lorakit's (it keeps classifier heads), so a name list is the only spelling both read alike.
    PEFT reads a list entry, and a rank/alpha pattern key, as the path or any dotted suffix of
    it; where that would also take in another module of the model (``module_names``; "lin" and
    "inner.lin"), the targets are written as a full-match regex and the keys anchored instead.
    """
    cls = method_class(config.method)
    target_paths = list(modules)

    def per_module(values: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(the most common value, {exact pattern: value} for the modules that differ)."""
        default = _most_common(values.values())
        return _number(default), {exact_key(p, target_paths): _number(v)
                                  for p, v in sorted(values.items()) if v != default}

    common = {
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": uses_conv1d,
        "inference_mode": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": saved_paths or None,
        "revision": None,
        "target_modules": _exact_targets(target_paths, module_names),
        "task_type": task_type,
    }
    return {**common, **cls.peft_config_fields(config, modules, per_module), "peft_type": cls.file_type()}


def from_peft_dict(data: dict[str, Any], source: str) -> AdapterConfig:
    """An AdapterConfig from PEFT's JSON, refusing options that would change the result."""
    peft_type = data.get("peft_type")
    cls = method_for_file_type(peft_type)
    if cls is None:
        readable = sorted({m.file_type() for m in METHODS.values()})
        raise AdapterFileError(f"{source}: peft_type {peft_type!r} is not supported (lorakit reads "
                               f"{', '.join(readable)})")
    fields = COMMON_FIELDS | cls.peft_config_keys
    for key, value in data.items():
        if key in fields or key in INFORMATIONAL:
            continue
        if value in (None, False, {}, [], "") or NEUTRAL_VALUES.get(key, object()) == value:
            log.info("%s: ignoring %s=%r (a default; lorakit has no such option)", source, key, value)
            continue
        raise AdapterFileError(
            f"{source}: {key}={value!r} is an option lorakit does not implement; loading the adapter "
            "without it would give different outputs"
        )
    if data.get("bias", "none") != "none":
        raise AdapterFileError(f"{source}: bias={data['bias']!r} adapters are not supported (only 'none')")
    if "target_modules" not in data or "r" not in data:
        raise AdapterFileError(f"{source}: missing 'target_modules' or 'r'")
    targets = data["target_modules"]
    common = {
        "r": int(data["r"]),
        "target_modules": targets if isinstance(targets, str) else tuple(targets),
        "layers_to_transform": _optional_tuple(data.get("layers_to_transform")),
        "layers_pattern": _layers_pattern(data.get("layers_pattern")),
        "modules_to_save": tuple(data.get("modules_to_save") or ()),
    }
    try:
        return AdapterConfig(**common, **cls.config_from_peft(data, source))
    except ConfigError as exc:
        raise AdapterFileError(f"{source}: {exc}") from exc


def _exact_targets(target_paths: list[str], module_names: Iterable[str]) -> list[str] | str:
    """A name list when each path names only itself under PEFT's suffix rule, else a full-match regex."""
    targets = sorted(target_paths)
    chosen = set(targets)
    for name in module_names:
        if name in chosen:
            continue
        parts = name.split(".")
        if any(".".join(parts[i:]) in chosen for i in range(1, len(parts))):
            return "|".join(re.escape(p) for p in targets)
    return targets


def exact_key(path: str, target_paths: list[str]) -> str:
    """A rank/alpha pattern key that PEFT's (and lorakit's) rule matches to ``path`` alone."""
    rule = rf"(.*\.)?({path})$"
    if any(other != path and re.match(rule, other) for other in target_paths):
        return "^" + re.escape(path)
    return path


def _most_common(values) -> Any:
    values = list(values)
    return max(set(values), key=values.count) if values else 0


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _optional_tuple(value: Any) -> tuple | None:
    if value is None:
        return None
    return (value,) if isinstance(value, int) else tuple(value)


def _layers_pattern(value: Any) -> str | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


# PEFT's task types by the ending of a transformers model class, so AutoPeftModelFor... can load a file.
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
              ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
              ("ForConditionalGeneration", "SEQ_2_SEQ_LM"))


def task_type_of(model: Any) -> str | None:
    """PEFT's ``task_type`` for a model (None for bare encoders and plain torch modules)."""
    name = type(model).__name__
    return next((task for ending, task in TASK_TYPES if name.endswith(ending)), None)
