"""``lorakit merge``: base + adapter → an ordinary Hugging Face model folder.

The folder loads with plain transformers and no lorakit. Before writing, the merged model is
compared with the adapted one on a few inputs and the largest logit difference is reported
(merges elsewhere have silently behaved differently from the adapter). An adapter whose method
cannot be merged (its update is no change of W) is refused before the base is loaded. Merging
is done in float32 and
rounded once to the model's dtype. An adapter trained on a 4-bit/8-bit base (QLoRA) is merged
into the full-precision base; the report says so and how far that is from the quantised model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.methods import require_mergeable
from lorakit.targets import CLASSIFIER_HEADS
from lorakit.train.models import load_tokenizer, resolve_model_dir

PROBE_TEXTS = (
    "The medication helped within a week and the side effects were mild.",
    "I would not recommend this to anyone; it made everything worse.",
    "A plain sentence to compare the two models on.",
)


def merge_to_folder(model_spec: str, adapter_dir: str | Path, out: str | Path,
                    check_fingerprint: bool = True) -> dict[str, Any]:
    adapter = lorakit.read_adapter(adapter_dir)  # refuse a bad file before loading the base
    require_mergeable(str(adapter_dir), adapter.config.method)
    folder = resolve_model_dir(model_spec)
    if folder is None:
        raise AdapterFileError("lorakit merge needs a model folder (or 'default'), not a random architecture")
    tokenizer = load_tokenizer(model_spec)
    probe = tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True, truncation=True, max_length=64)
    quantized = (adapter.lorakit or {}).get("quantize", "none")
    on_quantized = None
    if quantized != "none":  # first, so only one full-precision copy of the base is ever held
        on_quantized = _logits_on_quantized_base(folder, adapter, adapter_dir, probe, quantized, check_fingerprint)
    base = load_base_for(folder, adapter)
    adapted = lorakit.load_adapter(base, adapter_dir, check_fingerprint=check_fingerprint)
    with torch.no_grad():
        expected = _logits(adapted, probe)
        merged = adapted.merge_and_unload()
        got = _logits(merged, probe)
    difference = (expected.float() - got.float()).abs().max().item()
    out = Path(out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"max_logit_difference": difference, "out": str(out)}
    if quantized != "none":
        report["trained_on_quantized_base"] = quantized
        report["max_logit_difference_vs_quantized_base"] = (
            None if on_quantized is None else (on_quantized.float() - got.float()).abs().max().item())
    (out / "lorakit_merge.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"merged {adapter_dir} into {folder} → {out}; largest logit difference adapted vs merged: {difference:.3g}")
    if quantized != "none":
        vs = report["max_logit_difference_vs_quantized_base"]
        print(f"note: the adapter was trained on a {quantized}-quantised base (QLoRA); the merged model is the "
              "full-precision base plus the update, not the quantised model it was trained with. Largest logit "
              "difference merged vs the adapter on the quantised base: "
              + ("not computed (bitsandbytes is not installed)" if vs is None else f"{vs:.3g}"))
    return report


def _logits_on_quantized_base(
    folder: Path, adapter: lorakit.io.adapter_files.AdapterFile, adapter_dir: str | Path,
    probe: dict[str, torch.Tensor], mode: str, check_fingerprint: bool,
) -> torch.Tensor | None:
    """The adapter's logits on the base quantised as in training; None without bitsandbytes."""
    import importlib.util

    from lorakit.quantize import quantize_model

    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    base = quantize_model(load_base_for(folder, adapter), mode)
    adapted = lorakit.load_adapter(base, adapter_dir, check_fingerprint=check_fingerprint)
    with torch.no_grad():
        return _logits(adapted, probe)


def head_labels(adapter: lorakit.io.adapter_files.AdapterFile) -> int | None:
    """The label count of the classification head the adapter saved (modules_to_save), or None."""
    head = next((k for k in adapter.tensors if k.rsplit(".", 2)[-2] in CLASSIFIER_HEADS and k.endswith(".weight")),
                None)
    return None if head is None else adapter.tensors[head].shape[0]


def load_base_for(folder: Path, adapter: lorakit.io.adapter_files.AdapterFile) -> nn.Module:
    """The base model class the adapter was trained with: with its classification head when it saved one."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    num_labels = head_labels(adapter)
    if num_labels is not None:
        labels = (adapter.lorakit or {}).get("label_names")
        kwargs = {}
        if labels:
            kwargs = {"id2label": dict(enumerate(labels)), "label2id": {v: i for i, v in enumerate(labels)}}
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, **kwargs)
    config = json.loads((folder / "config.json").read_text())
    architecture = (config.get("architectures") or [""])[0]
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return AutoModelForCausalLM.from_pretrained(folder)
    return AutoModel.from_pretrained(folder)


def _logits(model: nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**probe)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
