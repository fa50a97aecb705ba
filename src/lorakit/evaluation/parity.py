"""Parity of what ships: a candidate merged into the base against the same candidate unmerged.

A merged adapter is what most users serve, and merges are where silent differences hide (half
precision rounding, a quantised base that cannot hold the update). Writable layers are merged
in place and unmerged afterwards (exactly: lorakit's unmerge restores W bit for bit); a
quantised layer cannot hold a merge, so for the measurement it is replaced by what
``merge_and_unload`` would give, the dequantised weight plus the update, and put back after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from lorakit.evaluation.passes import only
from lorakit.model import AdaptedModel


@contextlib.contextmanager
def merged(model: AdaptedModel, name: str) -> Iterator[list[str]]:
    """Inside the block the model runs with ``name`` merged; yields the paths of quantised layers
    that were replaced by their dequantised merge."""
    layers = model.layers_of(name)
    swapped: dict[str, tuple[torch.nn.Module, tuple[str, ...]]] = {}
    written: list[str] = []
    try:
        for path, layer in layers.items():
            if layer.kind.writable:
                layer.merge([name])
                written.append(path)
            else:
                plain, _ = layer.dequantised_merge([name])
                swapped[path] = (layer.base_layer, layer.active)
                layer.base_layer = plain
                layer.active = tuple(a for a in layer.active if a != name)
        yield sorted(swapped)
    finally:
        for path in written:
            layers[path].unmerge([name])
        for path, (original, active) in swapped.items():
            layers[path].base_layer = original
            layers[path].active = active


def parity(model: AdaptedModel, name: str, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The largest logit difference merged vs unmerged on ``batch``, in the model's own dtype."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode(), only(model, name):
        unmerged = _logits(model, inputs)
        with merged(model, name) as dequantised:
            got = _logits(model, inputs)
    mask = batch["attention_mask"].bool()
    difference = (unmerged - got).abs()
    if difference.dim() == 3:  # token logits: padding positions are not compared
        difference = difference[mask]
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
