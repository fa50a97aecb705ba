"""Mapping between lorakit's AdapterConfig and HF PEFT's ``adapter_config.json``.

PEFT spells fields its own way (``r``, ``lora_alpha``, ``use_dora``) and writes many keys for
features lorakit does not have. Policy for keys lorakit does not know: a key left at its
default value is ignored with a note; any other value is an error, because ignoring it would
change the result (a config written by a newer tool must not load as something else).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from lorakit.config import AdapterConfig
from lorakit.errors import AdapterFileError

log = logging.getLogger("lorakit")

# Keys that describe where a file came from, not what it computes.
INFORMATIONAL = frozenset({
    "peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping",
    "peft_version", "fan_in_fan_out", "init_lora_weights", "init_weights",
})
LORA_FIELDS = frozenset({
    "r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
    "modules_to_save", "lora_dropout", "layers_to_transform", "layers_pattern", "exclude_modules", "bias",
})
VERA_FIELDS = frozenset({
    "r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
    "modules_to_save", "layers_to_transform", "layers_pattern", "bias",
})
# PEFT options whose default is not falsy; at these values they change nothing.
NEUTRAL_VALUES: dict[str, Any] = {"megatron_core": "megatron.core", "qalora_group_size": 16}


def to_peft_dict(
    config: AdapterConfig,
    target_paths: list[str],
    saved_paths: list[str],
    ranks: dict[str, int],
    alphas: dict[str, float],
    uses_conv1d: bool,
    base_model_name_or_path: str | None,
    module_names: Iterable[str] = (),
    task_type: str | None = None,
) -> dict[str, Any]:
    """PEFT's config for an adapter whose per-module ranks and alphas are given exactly.

    Targets are written as exact module paths: PEFT's own "all-linear" rule differs from
    lorakit's (it keeps classifier heads), so a name list is the only spelling both read alike.
    PEFT reads a list entry, and a rank/alpha pattern key, as the path or any dotted suffix of
    it; where that would also take in another module of the model (``module_names``; "lin" and
    "inner.lin"), the targets are written as a full-match regex and the keys anchored instead.
    """
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
    if config.method == "vera":
        return {
            **common, "peft_type": "VERA", "r": config.r, "projection_prng_key": config.vera_seed,
            "save_projection": True, "vera_dropout": config.dropout, "d_initial": config.vera_d_initial,
            "init_weights": True,
        }
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    return {
        **common,
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": _number(alpha),
        "rank_pattern": {_exact_key(p, target_paths): v for p, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {_exact_key(p, target_paths): _number(v) for p, v in sorted(alphas.items()) if v != alpha},
        "use_rslora": config.use_rslora,
        "use_dora": config.method == "dora",
        "lora_dropout": config.dropout,
        "init_lora_weights": True,
        "exclude_modules": None,
    }


def from_peft_dict(data: dict[str, Any], source: str) -> AdapterConfig:
    """An AdapterConfig from PEFT's JSON, refusing options that would change the result."""
    peft_type = data.get("peft_type")
    if peft_type not in ("LORA", "VERA"):
        raise AdapterFileError(f"{source}: peft_type {peft_type!r} is not supported (LORA and VERA are)")
    fields = LORA_FIELDS if peft_type == "LORA" else VERA_FIELDS
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
    if peft_type == "VERA":
        if not data.get("save_projection", True):
            raise AdapterFileError(
                f"{source}: the VeRA projections were not saved (save_projection=false); "
                "re-save the adapter with save_projection=True"
            )
        return AdapterConfig(
            method="vera", dropout=float(data.get("vera_dropout", 0.0)),
            vera_seed=int(data.get("projection_prng_key", 0)), vera_d_initial=float(data.get("d_initial", 0.1)),
            **common,
        )
    return AdapterConfig(
        method="dora" if data.get("use_dora") else "lora",
        alpha=float(data.get("lora_alpha", 8)),
        dropout=float(data.get("lora_dropout", 0.0)),
        use_rslora=bool(data.get("use_rslora", False)),
        rank_pattern={k: int(v) for k, v in (data.get("rank_pattern") or {}).items()},
        alpha_pattern={k: float(v) for k, v in (data.get("alpha_pattern") or {}).items()},
        exclude_modules=_optional_tuple_or_str(data.get("exclude_modules")),
        **common,
    )


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


def _exact_key(path: str, target_paths: list[str]) -> str:
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


def _optional_tuple_or_str(value: Any) -> tuple | str | None:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


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
