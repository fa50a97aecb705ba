"""Plain-language warnings about what the figures mean, so a failure cannot hide in a table.

An adapter that learned the majority label scores that label's share, which can look like a
big gain over a base with an untrained head; an encoder whose representation was rewritten still
classifies; a gain inside its confidence interval is not a gain. Each warning names the figure it
comes from, and the report lists them first.
"""

from __future__ import annotations

from typing import Any

from lorakit.evaluation.passes import Paired
from lorakit.evaluation.sources import EvalSet

ONE_LABEL_SHARE = 0.99  # predicting one label this often is predicting a constant
EMBEDDING_COSINE_FLOOR = 0.5  # below it, general text no longer looks like it did to the base
FORGETTING_NATS = 0.1  # per-token loss on general text up by more than this
PARITY_LIMIT = 1e-3  # merged and unmerged logits further apart than this are different models


def warnings_for(name: str, data: EvalSet, paired: Paired, section: dict[str, Any]) -> list[str]:
    found = []
    task = section["task"]
    if data.task == "classify" and paired.adapted.predicted is not None and len(data):
        counts = paired.adapted.predicted.bincount(minlength=len(data.label_names or []))
        top = int(counts.argmax())
        share = counts[top].item() / len(data)
        if share >= ONE_LABEL_SHARE:
            label = data.label_names[top] if data.label_names else str(top)
            truth = sum(ref == label for ref in data.references) / len(data)
            found.append(f"{name} predicts '{label}' for {counts[top].item()} of {len(data)} examples: its accuracy "
                         f"({100 * task['adapted']:.1f}%) is that label's share of the data ({100 * truth:.1f}%); "
                         "it learned the majority label, not the task (try a lower --lr, or --scheduler cosine)")
    low, high = task["difference_ci"]
    if low <= 0 <= high:
        found.append(f"{name}: the change in {task['metric_name']} ({task['difference']:+.4g}) is within its 95% "
                     f"interval [{low:.3g}, {high:.3g}]: not distinguishable from no change on {task['examples']} "
                     "examples")
    general = section.get("general") or {}
    cosine = general.get("embedding_cosine")
    if cosine is not None and cosine < EMBEDDING_COSINE_FLOOR:
        found.append(f"{name}: general text's pooled embeddings keep a cosine of {cosine:.3f} to the base's: the "
                     "adapter rewrote the encoder's representation rather than adapting it")
    nats = general.get("forgetting_nats")
    if nats is not None and nats > FORGETTING_NATS:
        found.append(f"{name}: general text got {nats:.3f} nats per token harder (forgetting)")
    keep = section["keep"]
    if keep["flips_right_to_wrong"] and keep.get("base_correct"):
        share = keep["flips_right_to_wrong"] / keep["base_correct"]
        if share > 0.05:
            found.append(f"{name} gets {keep['flips_right_to_wrong']} of the {keep['base_correct']} keep examples the "
                         f"base got right wrong ({100 * share:.0f}%)")
    parity = section["parity"]["max_logit_diff"]
    if parity > PARITY_LIMIT:
        found.append(f"{name}: merged and unmerged logits differ by up to {parity:.3g}; serve it unmerged or check "
                     "the merge")
    return found
