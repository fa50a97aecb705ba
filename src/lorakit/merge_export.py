"""``lorakit merge``: base + adapter → an ordinary Hugging Face model folder.

The folder loads with plain transformers and no lorakit. Before writing, the merged model is
compared with the adapted one on a few inputs and the largest logit difference is reported
(PITFALLS.md: merges that silently behave differently). Merging is done in float32 and
rounded once to the model's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.train.models import load_tokenizer, resolve_model_dir

PROBE_TEXTS = (
    "The medication helped within a week and the side effects were mild.",
    "I would not recommend this to anyone; it made everything worse.",
    "A plain sentence to compare the two models on.",
)
HEADS = ("classifier", "score")


def merge_to_folder(model_spec: str, adapter_dir: str | Path, out: str | Path,
                    check_fingerprint: bool = True) -> dict[str, Any]:
    adapter = lorakit.read_adapter(adapter_dir)  # refuse a bad file before loading the base
    folder = resolve_model_dir(model_spec)
    if folder is None:
        raise AdapterFileError("lorakit merge needs a model folder (or 'default'), not a random architecture")
    base = _load_base(folder, adapter)
    tokenizer = load_tokenizer(model_spec)
    adapted = lorakit.load_adapter(base, adapter_dir, check_fingerprint=check_fingerprint)
    probe = tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        expected = _logits(adapted, probe)
        merged = adapted.merge_and_unload()
        got = _logits(merged, probe)
    difference = (expected.float() - got.float()).abs().max().item()
    out = Path(out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"max_logit_difference": difference, "out": str(out)}
    (out / "lorakit_merge.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"merged {adapter_dir} into {folder} → {out}; largest logit difference adapted vs merged: {difference:.3g}")
    return report


def _load_base(folder: Path, adapter: lorakit.io.adapter_files.AdapterFile) -> nn.Module:
    """The base model class the adapter was trained with: with its classification head when it saved one."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    head = next((k for k in adapter.tensors if k.rsplit(".", 2)[-2] in HEADS and k.endswith(".weight")), None)
    if head is not None:
        labels = (adapter.lorakit or {}).get("label_names")
        num_labels = adapter.tensors[head].shape[0]
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
