"""From paired outcomes to the report's sections: the task metric, and what the adapter broke.

The task section answers "did it learn?" (base vs adapted, with paired bootstrap intervals);
the keep section answers "what did it break?": every example the base got right and the
adapter gets wrong, listed with its text, both answers and both probabilities, then the
examples it fixed, then the ones whose predicted distribution moved most (largest KL), which
is where the next flips will come from.
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.evaluation import statistics as S
from lorakit.evaluation.passes import Paired
from lorakit.evaluation.sources import EvalSet

MOVED_LISTED = 10
TEXT_SHOWN = 400  # characters of an example's text kept in the report


def task_section(data: EvalSet, paired: Paired, resamples: int, seed: int = 0) -> dict[str, Any]:
    n = len(data)
    base, adapted = paired.base, paired.adapted
    if data.task == "classify":
        section = {"metric_name": "accuracy", "source": data.source, "examples": n,
                   **S.paired(S.mean_of(base.correct), S.mean_of(adapted.correct), n, resamples, seed)}
        labels = len(data.label_names or []) or int(max(base.predicted.max(), adapted.predicted.max())) + 1
        truth = torch.tensor([data.label_names.index(r) for r in data.references])
        section["f1_macro"] = S.paired(S.macro_f1_of(base.predicted, truth, labels),
                                       S.macro_f1_of(adapted.predicted, truth, labels), n, resamples, seed)
        return section
    section = {"metric_name": "exact_match", "source": data.source, "examples": n,
               **S.paired(S.mean_of(base.correct), S.mean_of(adapted.correct), n, resamples, seed)}
    section["token_loss"] = S.paired(S.ratio_of(base.loss_sum, base.units), S.ratio_of(adapted.loss_sum, adapted.units),
                                     n, resamples, seed)
    section["answer_tokens"] = int(paired.units.sum())
    if data.dropped:
        section["dropped_examples"] = data.dropped
    return section


def flip_indices(paired: Paired) -> tuple[list[int], list[int]]:
    """(right → wrong, wrong → right) example indices, the larger probability change first."""
    b, a = paired.base.correct, paired.adapted.correct
    change = (paired.adapted.prob - paired.base.prob).abs()
    broke = (b & ~a).nonzero().flatten().tolist()
    fixed = (~b & a).nonzero().flatten().tolist()
    return sorted(broke, key=lambda i: -change[i].item()), sorted(fixed, key=lambda i: -change[i].item())


def moved_most(paired: Paired, limit: int = MOVED_LISTED) -> list[int]:
    kl = paired.kl
    order = torch.argsort(kl, descending=True).tolist()
    return [i for i in order[:limit] if kl[i] > 0]


def example_row(data: EvalSet, paired: Paired, i: int, answers: dict[str, dict[int, str]]) -> dict[str, Any]:
    """One listed example: text, reference, both answers and probabilities, KL."""
    text = data.texts[i]
    row = {
        "index": i, "text": text if len(text) <= TEXT_SHOWN else text[:TEXT_SHOWN] + "…",
        "reference": data.references[i],
        "base_answer": _answer(data, paired.base.predicted, answers.get("base"), i),
        "adapted_answer": _answer(data, paired.adapted.predicted, answers.get("adapted"), i),
        "base_prob": paired.base.prob[i].item(), "adapted_prob": paired.adapted.prob[i].item(),
        "kl": paired.kl[i].item(),
        "base_correct": bool(paired.base.correct[i]), "adapted_correct": bool(paired.adapted.correct[i]),
    }
    return row


def _answer(data: EvalSet, predicted: torch.Tensor | None, generated: dict[int, str] | None, i: int) -> str | None:
    if predicted is not None and data.label_names:
        return data.label_names[int(predicted[i])]
    if generated is not None and i in generated:
        return generated[i]
    return None


def keep_section(data: EvalSet, paired: Paired, answers: dict[str, dict[int, str]]) -> dict[str, Any]:
    broke, fixed = flip_indices(paired)
    moved = moved_most(paired)
    units = paired.units.sum().clamp_min(1)
    return {
        "source": data.source, "examples": len(data), "base_correct": int(paired.base.correct.sum()),
        "adapted_correct": int(paired.adapted.correct.sum()),
        "flips_right_to_wrong": len(broke), "flips_wrong_to_right": len(fixed),
        # classify: KL of the label distribution per example; causal-lm: per answer token
        "mean_kl": (paired.kl_sum.sum() / units).item(), "max_kl": paired.kl.max().item() if len(data) else 0.0,
        "kl_unit": "example" if data.task == "classify" else "token",
        "right_to_wrong": [example_row(data, paired, i, answers) for i in broke],
        "wrong_to_right": [example_row(data, paired, i, answers) for i in fixed],
        "moved_most": [example_row(data, paired, i, answers) for i in moved],
    }


def listed_indices(paired: Paired) -> list[int]:
    """Examples a keep section lists (whose greedy answers a causal-lm report generates)."""
    broke, fixed = flip_indices(paired)
    return sorted(set(broke) | set(fixed) | set(moved_most(paired)))


def merge_keep_sections(sections: list[dict[str, Any]]) -> dict[str, Any]:
    """Several keep files: totals over all of them, each file's section kept under ``files``."""
    if len(sections) == 1:
        return {**sections[0], "files": sections}
    total_units = sum(s["examples"] for s in sections)
    mean_kl = sum(s["mean_kl"] * s["examples"] for s in sections) / max(total_units, 1)
    merged: dict[str, Any] = {"source": ", ".join(s["source"] for s in sections), "examples": total_units,
                              "mean_kl": mean_kl, "max_kl": max(s["max_kl"] for s in sections), "files": sections}
    for key in ("base_correct", "adapted_correct", "flips_right_to_wrong", "flips_wrong_to_right"):
        merged[key] = sum(s[key] for s in sections)
    for key in ("right_to_wrong", "wrong_to_right", "moved_most"):
        merged[key] = [dict(row, source=s["source"]) for s in sections for row in s[key]]
    merged["kl_unit"] = sections[0]["kl_unit"]
    return merged
