"""Forgetting during training: general text measured once before the first step and at every evaluation.

The loop calls three hooks (``start``, ``evaluate``, ``summary``); everything a resumed run needs
(the "before" measure, the figures of the best evaluation, the time spent) lives in the trainer's
state dict, so ``--resume`` never re-measures "before" from a model that has already changed.

Causal LMs record ``forgetting_nats`` (and the mean cross-entropy ``general_nats``); classifiers
and encoders record ``embedding_cosine``. The step-0 row of metrics.jsonl is the reference itself
(forgetting 0, cosine 1), so curves start from it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
from torch import nn

from lorakit.forgetting import GeneralMeasure, compare_general, measure_general
from lorakit.general_text import read_passages, shipped_passages
from lorakit.train.config import TrainConfig
from lorakit.train.setup import Prepared

BATCH_SIZE = 16  # passages per forward: the training batch size of the default run

log = logging.getLogger("lorakit")


class GeneralTracker:
    def __init__(self, config: TrainConfig, prepared: Prepared, device: torch.device, autocast) -> None:
        self.enabled = config.general_samples > 0
        self.source = config.general_data or "shipped"
        passages: list[str] = []
        if self.enabled:  # read now, so a bad --general-data fails before the run writes anything
            passages = read_passages(config.general_data) if config.general_data else shipped_passages()
        self.passages = passages[:config.general_samples]
        self.max_length = prepared.length.tokens
        self.prepared = prepared
        self.device = device
        self.autocast = autocast

    def measure(self, model: nn.Module) -> GeneralMeasure:
        return measure_general(model, self.prepared.tokenizer, self.passages, max_length=self.max_length,
                               batch_size=BATCH_SIZE, device=self.device, autocast=self.autocast)

    def start(self, state: dict[str, Any]) -> dict[str, float]:
        """Measure "before" unless a resumed state holds it; the fields of the step-0 metrics row."""
        if not self.enabled:
            return {}
        stored = state.get("general_before")
        if state["step"] > 0 and (stored is None or _passages_in(stored) != len(self.passages)):
            # A resumed run whose checkpoint holds no matching "before" (measured off, or other passages):
            # the model has moved, so measuring "before" now would be wrong.
            log.warning("general-text forgetting is off for this resumed run: its checkpoint holds no 'before' "
                        "measure of these %d passages", len(self.passages))
            self.enabled = False
            return {}
        if stored is None:
            started = time.perf_counter()
            adapted = self.prepared.adapted
            with adapted.base_only() if adapted is not None else contextlib.nullcontext():
                before = self.measure(self.prepared.model)
            state["general_before"] = before.as_dict()
            state["general_seconds"] = time.perf_counter() - started
        before = GeneralMeasure.from_dict(state["general_before"])
        return _record(compare_general(before, before))  # the reference itself: forgetting 0, cosine 1

    def evaluate(self, model: nn.Module, state: dict[str, Any]) -> dict[str, float]:
        """Measure the model as it is now; the fields of this evaluation's metrics row."""
        if not self.enabled:
            return {}
        started = time.perf_counter()
        figures = compare_general(GeneralMeasure.from_dict(state["general_before"]), self.measure(model))
        state["general_seconds"] = state.get("general_seconds", 0.0) + time.perf_counter() - started
        state["general_last"] = figures
        return _record(figures)

    def keep_best(self, state: dict[str, Any]) -> None:
        """The last evaluation's model is the one that will be saved (--select): its figures go in the summary."""
        if self.enabled:
            state["general_best"] = state["general_last"]

    def summary(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """summary.json's ``general``: the figures of the saved (best) model and how they were measured."""
        if not self.enabled:
            return None
        return {**(state.get("general_best") or {}), "passages": len(self.passages), "source": self.source,
                "max_length": self.max_length, "seconds": round(state.get("general_seconds", 0.0), 3)}


def _passages_in(stored: dict[str, Any]) -> int:
    counts = stored.get("token_counts")
    return len(counts) if counts is not None else len(stored["embeddings"])


def _record(figures: dict[str, float]) -> dict[str, float]:
    """The figures metrics.jsonl keeps: one per evaluation, the curve's quantity."""
    if "forgetting_nats" in figures:
        return {"forgetting_nats": figures["forgetting_nats"], "general_nats": figures["nats_after"]}
    return {"embedding_cosine": figures["embedding_cosine"]}
