"""Plain-language warnings about what a report's figures mean, so a failure cannot hide in a
table: the symptoms training also prints (:mod:`lorakit.symptoms`), plus a gain inside its
confidence interval, broken keep answers and a merge that changes the model. The report lists
them first."""

from __future__ import annotations

from typing import Any

from lorakit.evaluation.passes import Paired
from lorakit.evaluation.sources import EvalSet
from lorakit.symptoms import general_text, one_label

PARITY_LIMIT = 1e-3  # merged and unmerged logits further apart than this are different models


def warnings_for(name: str, data: EvalSet, paired: Paired, section: dict[str, Any]) -> list[str]:
    found = []
    task = section["task"]
    if data.task == "classify" and paired.adapted.predicted is not None and data.label_names:
        labels = len(data.label_names)
        truth = [sum(ref == label for ref in data.references) for label in data.label_names]
        found.append(one_label(name, paired.adapted.predicted.bincount(minlength=labels).tolist(), data.label_names,
                               truth, task["adapted"]))
    low, high = task["difference_ci"]
    if low <= 0 <= high:
        found.append(f"{name}: the change in {task['metric_name']} ({task['difference']:+.4g}) is within its 95% "
                     f"interval [{low:.3g}, {high:.3g}]: not distinguishable from no change on {task['examples']} "
                     "examples")
    found += general_text(name, section.get("general"))
    keep = section["keep"]
    if keep["flips_right_to_wrong"] and keep.get("base_correct") and not keep.get("base_head_untrained"):
        share = keep["flips_right_to_wrong"] / keep["base_correct"]
        if share > 0.05:
            found.append(f"{name} gets {keep['flips_right_to_wrong']} of the {keep['base_correct']} keep examples the "
                         f"base got right wrong ({100 * share:.0f}%)")
    parity = section["parity"]["max_logit_diff"]
    if parity is not None and parity > PARITY_LIMIT:
        found.append(f"{name}: merged and unmerged logits differ by up to {parity:.3g}; serve it unmerged or check "
                     "the merge")
    return [w for w in found if w]
