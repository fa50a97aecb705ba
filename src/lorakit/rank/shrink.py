"""Shrinking a trained adapter: each module's update truncated by an exact SVD, written as a plain LoRA.

Per module the rank is the effective rank at an energy threshold (``--shrink 0.95``) or a fixed
rank (``--shrink-rank 4``), at least 1 and at most the rank the update has. The truncation is the
best approximation of that rank (Eckart–Young) of the whole exported update s·B·A, computed
through its r×r core (:func:`lorakit.rank.spectra.truncated_factors`), never as an (out, in)
matrix. The result keeps each module's scaling s (its alpha becomes s·k, or s·√k with rsLoRA),
its trained copies (a classifier head) and lorakit's metadata, and is written with a
``rank_pattern`` PEFT reads. What it costs is measured on what ships: the written folder is
loaded back onto the same base and its logits compared with the original adapter's.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

import lorakit
from lorakit.config import AdapterConfig, alpha_for, exact_pattern
from lorakit.errors import ConfigError
from lorakit.io.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from lorakit.rank.spectra import truncated_factors
from lorakit.rank.trained import NAME, LoadedAdapter, TrainedModule
from lorakit.train.chat import TEMPLATE_FILE

SHRUNK, SHIPPED = "shrunk", "shipped"
# Metadata `save_adapter` writes itself; the rest (task, label names, quantize) travels to the smaller adapter.
OWN_METADATA = ("version", "method", "config", "fingerprints", "vocab_size")


@dataclass
class ShrinkResult:
    ranks: dict[str, int]
    max_logit_difference: float
    bytes_before: int
    bytes_after: int
    params_before: int
    params_after: int


def shrink_ranks(modules: dict[str, TrainedModule], energy: float | None, rank: int | None) -> dict[str, int]:
    """The rank each module keeps: its effective rank at ``energy``, or ``rank`` (never more than it has)."""
    if (energy is None) == (rank is None):
        raise ConfigError("give one of --shrink (an energy share, e.g. 0.95) and --shrink-rank (a rank)")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(f"--shrink is the share of each update's energy to keep, in (0, 1]; got {energy}")
    if rank is not None and rank < 1:
        raise ConfigError(f"--shrink-rank must be at least 1, got {rank}")
    kept = {}
    for path, module in modules.items():
        k = module.spectrum.effective_rank(energy) if energy is not None else rank
        k = module.factor_rank if k is None else k  # (a factor spectrum is always complete)
        kept[path] = max(1, min(k, module.factor_rank))  # an update of zero keeps one (zero) direction
    return kept


def shrink_adapter(loaded: LoadedAdapter, modules: dict[str, TrainedModule], ranks: dict[str, int],
                   out: str | Path) -> ShrinkResult:
    """Write the truncated adapter to ``out`` and measure it against the original."""
    model, original = loaded.model, loaded.model.configs[NAME]
    out = Path(out)
    if out.resolve() == loaded.folder.resolve():
        raise ConfigError(f"--out {out} is the adapter's own folder; write the smaller adapter somewhere else")
    config = _plain_lora_config(original, modules, ranks)
    model.add_adapter(SHRUNK, config, activate=False)
    originals = model.adapter_modules(NAME)
    for path, method in model.adapter_modules(SHRUNK).items():
        A, B_scaled = originals[path].exported_factors()
        A_k, B_k = truncated_factors(A, B_scaled, ranks[path])
        method.take_combination(A_k.to(A.dtype), B_k.to(B_scaled.dtype), [])
    with torch.no_grad():
        for saved in model.saved_modules().values():  # the trained head travels as it is
            if NAME in saved.copies:
                saved.copies[SHRUNK].load_state_dict(saved.copies[NAME].state_dict())
    metadata = {k: v for k, v in (loaded.file.lorakit or {}).items() if k not in OWN_METADATA}
    lorakit.save_adapter(model, out, name=SHRUNK, base_model_name_or_path=recorded_base_name(loaded),
                         extra_metadata=metadata)
    template = loaded.folder / TEMPLATE_FILE  # chats are read with the template the adapter was trained with
    if template.is_file():
        shutil.copy2(template, out / TEMPLATE_FILE)
    model.delete_adapter(SHRUNK)
    lorakit.load_adapter(model, out, name=SHIPPED, activate=False)
    difference = logit_difference(model, loaded.model_spec, NAME, SHIPPED)
    model.delete_adapter(SHIPPED)
    model.set_active(NAME)
    return ShrinkResult(
        ranks=dict(ranks), max_logit_difference=difference,
        bytes_before=(loaded.folder / WEIGHTS_NAME).stat().st_size, bytes_after=(out / WEIGHTS_NAME).stat().st_size,
        params_before=sum(m.factor_rank * (m.spectrum.in_features + m.spectrum.out_features)
                          for m in modules.values()),
        params_after=sum(k * (modules[p].spectrum.in_features + modules[p].spectrum.out_features)
                         for p, k in ranks.items()),
    )


def _plain_lora_config(original: AdapterConfig, modules: dict[str, TrainedModule],
                       ranks: dict[str, int]) -> AdapterConfig:
    """A plain LoRA on the same modules with the new ranks and each module's scaling kept."""
    rslora = original.use_rslora
    # s = 1 where the method's own scaling is not positive
    alphas = {p: alpha_for(modules[p].scaling if modules[p].scaling > 0 else 1.0, k, rslora) for p, k in ranks.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return AdapterConfig(
        method="lora", r=r, alpha=alpha, dropout=original.dropout, use_rslora=rslora,
        target_modules=tuple(ranks), modules_to_save=original.modules_to_save,
        rank_pattern={exact_pattern(p): k for p, k in ranks.items() if k != r},
        alpha_pattern={exact_pattern(p): a for p, a in alphas.items() if a != alpha},
    )


def recorded_base_name(loaded: LoadedAdapter) -> str | None:
    """The base name the original adapter_config.json records (what PEFT users load the base by)."""
    from lorakit.train.models import name_for_files

    try:
        recorded = json.loads((loaded.folder / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        recorded = None
    return recorded or name_for_files(loaded.model_spec)


def probe_batch(tokenizer, texts: tuple[str, ...] | list[str], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask of a few texts (HF tokenizers and the byte stand-in alike)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [list(tokenizer.encode(text))[:max_length] or [pad] for text in texts]
    longest = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logit_difference(model: lorakit.AdaptedModel, model_spec: str, first: str, second: str) -> float:
    """The largest |logit| difference between two adapters of ``model`` on a few probe texts (real tokens only)."""
    from lorakit.merge_export import PROBE_TEXTS
    from lorakit.train.models import load_tokenizer

    batch = probe_batch(load_tokenizer(model_spec), PROBE_TEXTS)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    outputs = []
    for name in (first, second):
        model.set_active(name)
        out = model(**batch)
        logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
        outputs.append(logits.float())
    if outputs[0].dim() == 3:  # per token: padded positions are not compared
        keep = batch["attention_mask"].bool()
        return float((outputs[0][keep] - outputs[1][keep]).abs().max())
    return float((outputs[0] - outputs[1]).abs().max())
