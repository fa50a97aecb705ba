"""Parity of what ships: a candidate merged into the base against the same candidate unmerged.

A merged adapter is what most users serve, and merges are where silent differences hide (half
precision rounding, a quantised base that cannot hold the update). The measurement must leave
the model exactly as it found it, and an in-place merge followed by an unmerge does not in
float32 (W + ΔW − ΔW rounds), nor can it hold a whole merged copy of a large model. So each
adapted layer's base is replaced, for the duration, by a view that builds the merged weight at
forward time, one layer at a time, exactly as a merge would write it: computed in float32 and
rounded once to the base's dtype; on a quantised base, the dequantised weight plus the update in
the dtype the base was quantised from (what ``merge_and_unload`` returns).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lorakit.evaluation.passes import only
from lorakit.layer import AdaptedLayer
from lorakit.methods import method_class
from lorakit.model import AdaptedModel


class _MergedOnTheFly(nn.Module):
    """Stands in for a base layer: runs it with adapter ``name`` merged into its weight."""

    def __init__(self, layer: AdaptedLayer, name: str) -> None:
        super().__init__()
        self.original = layer.base_layer
        self.kind = layer.kind
        self.method = layer.adapters[name]

    def forward(self, *args, **kwargs):
        W0 = self.kind.weight_matrix(self.original).float()
        W = self.method.merged_weight(W0, forward_base=W0)
        if not self.kind.writable:
            return self.kind.to_plain(self.original, W)(*args, **kwargs)
        stored = torch.empty_like(self.original.weight)
        self.kind.as_matrix(stored).copy_(W)  # rounded once to the base's dtype, as merge() writes it
        return functional_call(self.original, {"weight": stored}, args, kwargs)


@contextlib.contextmanager
def merged(model: AdaptedModel, name: str) -> Iterator[list[str]]:
    """Inside the block the model runs as if ``name`` were merged; nothing is written. Yields the
    paths of quantised layers (whose merged form is the dequantised weight plus the update)."""
    layers = model.layers_of(name)
    saved = {path: (layer.base_layer, layer.active) for path, layer in layers.items()}
    try:
        for layer in layers.values():
            view = _MergedOnTheFly(layer, name)
            layer.active = tuple(a for a in layer.active if a != name)
            layer.base_layer = view
        yield sorted(path for path, layer in layers.items() if not layer.kind.writable)
    finally:
        for path, (original, active) in saved.items():
            layers[path].base_layer = original
            layers[path].active = active


def parity(model: AdaptedModel, name: str, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The largest logit difference merged vs unmerged on ``batch``, in the model's own dtype; for a
    method that cannot be merged (a non-linear update), that fact and its reason instead."""
    method = method_class(model.configs[name].method)
    if not method.mergeable:
        return {"max_logit_diff": None, "mergeable": False,
                "note": f"{method.method_name} cannot be merged: {method.why_not_mergeable}; it ships unmerged"}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode(), only(model, name):
        unmerged = _logits(model, inputs)
        with merged(model, name) as dequantised:
            got = _logits(model, inputs)
    difference = (unmerged - got).abs()
    if difference.dim() == 3:  # token logits: padding positions are not compared
        difference = difference[batch["attention_mask"].bool()]
    result: dict[str, Any] = {"max_logit_diff": difference.max().item(), "examples": int(inputs["input_ids"].shape[0]),
                              "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    if dequantised:
        result["quantized_base"] = True
        result["note"] = (f"{len(dequantised)} layers sit on a quantised base, which cannot hold a merge; the merged "
                          "model is the dequantised base plus the update (what merge_and_unload returns)")
    return result


def _logits(model: AdaptedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out[0]).float()
