"""Any mergeable lorakit adapter as a plain PEFT LoRA folder, measured against the original.

The folder is what serving engines (vLLM, SGLang, LoRAX, TGI) load: ``peft_type`` LORA,
``adapter_model.safetensors`` and ``adapter_config.json`` with nothing PEFT or vLLM would refuse.
Every module's scaling is folded into ``lora_B``: ``lora_alpha`` equals each module's rank
(``alpha_pattern`` = ``rank_pattern`` where ranks differ) and ``use_rslora`` is false, so PEFT's
per-module alpha / r and an engine that reads one ``lora_alpha`` / ``r`` for the whole adapter
(vLLM) both compute a scaling of exactly 1, and rsLoRA needs no support from the reader. ``r`` is
the largest rank in the file, which is what an engine's rank limit must cover.

After writing, the folder is loaded back onto the same base and its logits compared with the
original adapter's on the probe texts ``lorakit merge`` uses; the largest difference, the source
method, the rule and each module's rank and kept energy go into the safetensors metadata (under
``lorakit`` → ``export``, which PEFT ignores) and into ``lorakit_export.json`` beside it. The folder
appears complete or not at all (:mod:`lorakit.export.staging`).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.config import AdapterConfig, exact_pattern
from lorakit.export.factors import (
    DEFAULT_ENERGY,
    ModuleExport,
    RankRule,
    exact_from_factors,
    plain_factors,
    require_exportable,
)
from lorakit.export.staging import check_destination, staged_folder
from lorakit.io.adapter_files import CONFIG_NAME, WEIGHTS_NAME, adapter_folder, base_model_for
from lorakit.io.atomic import write_atomically, write_text_atomically
from lorakit.io.peft_config import exact_key
from lorakit.merge_export import PROBE_TEXTS
from lorakit.methods import method_class
from lorakit.model import AdaptedModel
from lorakit.rank.shrink import OWN_METADATA, logit_difference, recorded_base_name
from lorakit.rank.trained import LoadedAdapter, load_base
from lorakit.train.chat import TEMPLATE_FILE

EXPORT_FILE = "lorakit_export.json"
SOURCE, EXPORTED, SHIPPED = "source", "export", "shipped"  # adapter names on the loaded model


@dataclass
class ExportResult:
    out: Path
    method: str
    modules: dict[str, ModuleExport]
    max_logit_difference: float
    base_model_name: str | None  # what the folder records as its base (None: a random architecture)
    keeps_head: bool  # the export carries trained modules_to_save (a classifier head)
    task_type: str | None  # PEFT's task type the folder records (CAUSAL_LM for what engines generate with)
    summary: dict[str, Any]  # what lorakit_export.json and the metadata hold

    @property
    def ranks(self) -> dict[str, int]:
        return {p: m.rank for p, m in self.modules.items()}


def default_out(adapter: str | Path) -> Path:
    """``runs/chat`` → ``runs/chat-plain-lora``: beside the adapter (or run) folder as it was given."""
    given = Path(adapter)
    given = given if given.name else given.resolve()
    return given.with_name(given.name + "-plain-lora")


def export_plain_lora(adapter: str | Path, out: str | Path | None = None, rule: RankRule | None = None,
                      model_spec: str | None = None, *, check_fingerprint: bool = True) -> ExportResult:
    """Write adapter (folder or `lorakit train` run) ``adapter`` as a plain PEFT LoRA in ``out``.

    Everything that can be refused is refused before the base loads and before anything is
    written: an unreadable file, a method with no weight change (CeRA), a bad rule, an ``out``
    that holds something other than an earlier export.
    """
    rule = rule or RankRule()
    file = lorakit.read_adapter(adapter)
    require_exportable(str(adapter), file.config.method)
    folder = adapter_folder(adapter)
    out = Path(out) if out is not None else default_out(adapter)
    check_destination(out, EXPORT_FILE, folder)
    spec = base_model_for(str(adapter), model_spec)
    model = lorakit.load_adapter(load_base(spec, file, str(adapter)).eval(), file, name=SOURCE,
                                 check_fingerprint=check_fingerprint)
    modules = plain_factors(model, SOURCE, rule)
    _add_export(model, modules)
    base_name = recorded_base_name(LoadedAdapter(model, file, spec, folder))
    carried = {k: v for k, v in (file.lorakit or {}).items() if k not in (*OWN_METADATA, "export")}
    summary = _summary(str(adapter), file.config.method, base_name, rule, modules)
    with staged_folder(out) as staging:
        lorakit.save_adapter(model, staging, name=EXPORTED, base_model_name_or_path=base_name,
                             extra_metadata=carried)
        _largest_rank_first(staging / CONFIG_NAME, {p: m.rank for p, m in modules.items()})
        if (folder / TEMPLATE_FILE).is_file():  # lorakit serve reads chats with the template it trained on
            shutil.copy2(folder / TEMPLATE_FILE, staging / TEMPLATE_FILE)
        model.delete_adapter(EXPORTED)
        lorakit.load_adapter(model, staging, name=SHIPPED, activate=False, check_fingerprint=check_fingerprint)
        summary["max_logit_difference"] = logit_difference(model, spec, SOURCE, SHIPPED)  # what ships, read back
        _stamp_metadata(staging / WEIGHTS_NAME, summary)
        write_text_atomically(staging / EXPORT_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    task_type = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8")).get("task_type")
    return ExportResult(out, file.config.method, modules, summary["max_logit_difference"], base_name,
                        bool(model.configs[SOURCE].modules_to_save), task_type, summary)


def _add_export(model: AdaptedModel, modules: dict[str, ModuleExport]) -> None:
    """A plain LoRA adapter EXPORTED on the same modules whose updates are the exported factors,
    with the source's trained copies (a classifier head)."""
    source = model.configs[SOURCE]
    model.add_adapter(EXPORTED, plain_lora_config(source, {p: m.rank for p, m in modules.items()}), activate=False)
    for path, method in model.adapter_modules(EXPORTED).items():
        method.take_combination(modules[path].A, modules[path].B, [])  # scaling 1: lora_B = B
    with torch.no_grad():
        for saved in model.saved_modules().values():
            if SOURCE in saved.copies:
                saved.copies[EXPORTED].load_state_dict(saved.copies[SOURCE].state_dict())


def plain_lora_config(source: AdapterConfig, ranks: dict[str, int]) -> AdapterConfig:
    """A plain LoRA on exactly these modules with these ranks and a scaling of 1 on each (alpha = rank)."""
    top = max(ranks.values())
    smaller = {exact_pattern(p): k for p, k in ranks.items() if k != top}
    return AdapterConfig(
        method="lora", r=top, alpha=float(top), dropout=source.dropout, use_rslora=False,
        target_modules="|".join(re.escape(p) for p in ranks), modules_to_save=source.modules_to_save,
        rank_pattern=smaller, alpha_pattern={key: float(k) for key, k in smaller.items()},
    )


def _largest_rank_first(config_path: Path, ranks: dict[str, int]) -> None:
    """Make ``r`` (and ``lora_alpha``) the largest rank, the others patterns: engines check their rank
    limit against ``r``, and one that ignores the patterns still computes alpha / r = 1."""
    data = json.loads(config_path.read_text(encoding="utf-8"))
    top, paths = max(ranks.values()), sorted(ranks)
    pattern = {exact_key(p, paths): k for p, k in sorted(ranks.items()) if k != top}
    data.update(r=top, lora_alpha=top, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern))
    write_text_atomically(config_path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _stamp_metadata(weights: Path, summary: dict[str, Any]) -> None:
    """Add the export summary to the safetensors header (under ``lorakit``); the tensors are unchanged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(weights), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(str(weights))
    own = json.loads(metadata.get("lorakit", "{}"))
    own["export"] = summary
    metadata["lorakit"] = json.dumps(own)
    write_atomically(weights, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _summary(adapter: str, method: str, base_name: str | None, rule: RankRule,
             modules: dict[str, ModuleExport]) -> dict[str, Any]:
    ranks = [m.rank for m in modules.values()]
    kept = [m.energy_kept for m in modules.values()]
    exact_source = exact_from_factors(method)
    if exact_source and not rule.given:
        how = "the adapter's own factors, whole (exact)"
    else:
        how = ("its factors' truncated SVD" if exact_source else "the truncated SVD of ΔW = W' − W") + \
              f": {rule.describe()}"
    return {
        "format": "plain-lora",
        "source": {"adapter": adapter, "method": method, "title": method_class(method).title or method},
        "base_model_name_or_path": base_name,
        "how": how,
        "rule": {"chosen_by": "--rank" if rule.rank is not None else "--energy" if rule.energy is not None else
                 "default", "rank": rule.rank, "max_rank": rule.max_rank,
                 "energy": None if rule.rank is not None or (exact_source and not rule.given) else
                 rule.energy or DEFAULT_ENERGY},
        "scaling": "folded into lora_B: lora_alpha = rank on every module, use_rslora false",
        "exact": all(m.exact for m in modules.values()),
        "rank": {"min": min(ranks), "max": max(ranks)},
        "energy_kept": {"min": min(kept), "mean": sum(kept) / len(kept)},
        "probe_texts": len(PROBE_TEXTS),
        "max_logit_difference": None,  # filled in once the written folder is measured
        "modules": {p: {"rank": m.rank, "energy_kept": m.energy_kept, "exact": m.exact, "from": m.source}
                    for p, m in modules.items()},
    }
