"""Symptoms of a run that went wrong while its headline number looks fine, in plain words.

Shared by ``lorakit train`` (printed with its summary) and ``lorakit eval`` (listed first in the
report): an adapter that predicts one label scores that label's share of the data, which can look
like a large gain over a base with an untrained head; an encoder whose representation was
rewritten still classifies; general text that got much harder to predict is forgetting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ONE_LABEL_SHARE = 0.99  # predicting one label this often is predicting a constant
EMBEDDING_COSINE_FLOOR = 0.5  # below it, general text no longer looks to the encoder as it did to the base
FORGETTING_NATS = 0.1  # general text's per-token loss up by more than this


def one_label(who: str, predicted_counts: Sequence[int], label_names: Sequence[str] | None,
              truth_counts: Sequence[int], accuracy: float) -> str | None:
    """A warning when one label is (almost) all that is predicted; None otherwise."""
    total = sum(predicted_counts)
    if not total:
        return None
    top = max(range(len(predicted_counts)), key=lambda i: predicted_counts[i])
    if predicted_counts[top] / total < ONE_LABEL_SHARE:
        return None
    label = label_names[top] if label_names and top < len(label_names) else str(top)
    share = truth_counts[top] / max(sum(truth_counts), 1) if top < len(truth_counts) else 0.0
    return (f"{who} predicts '{label}' for {predicted_counts[top]} of {total} examples: its accuracy "
            f"({100 * accuracy:.1f}%) is that label's share of the data ({100 * share:.1f}%); it learned the "
            "majority label, not the task (try a lower --lr or --scheduler cosine)")


def general_text(who: str, figures: dict[str, Any] | None) -> list[str]:
    """Warnings from general-text figures (lorakit.forgetting.compare_general's keys)."""
    found = []
    figures = figures or {}
    cosine = figures.get("embedding_cosine")
    if cosine is not None and cosine < EMBEDDING_COSINE_FLOOR:
        found.append(f"{who}: general text's pooled embeddings keep a cosine of {cosine:.3f} to the base's: the "
                     "adapter rewrote the encoder's representation rather than adapting it")
    nats = figures.get("forgetting_nats")
    if nats is not None and nats > FORGETTING_NATS:
        found.append(f"{who}: general text got {nats:.3f} nats per token harder to predict (forgetting)")
    return found
