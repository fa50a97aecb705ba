"""Paired forward passes: the base and an adapter on the same batch, compared example by example.

One batch is run twice, once with every adapter switched off (``base_only``) and once with the
candidate active, and everything the report needs is taken from the two outputs before the next
batch: per-example correctness and the probability of the reference, and the KL divergence
KL(base ‖ adapted) of the predicted distributions. Logits are never kept, so memory does not
grow with the data, and an example costs two forward passes.

For a causal LM, "correct" means the greedy answer equals the reference: with teacher forcing,
greedy decoding reproduces the reference exactly when the argmax at every answer position is
the reference's next token (its end-of-sequence token included), so the two passes decide
exact match without generating. The answers themselves are generated only for the few examples
a report lists (:func:`greedy_answers`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorakit.evaluation.sources import EvalSet
from lorakit.model import AdaptedModel
from lorakit.train import batches as B


@dataclass
class Outcomes:
    """What one model did on each example of a set."""

    correct: torch.Tensor  # (n,) bool
    prob: torch.Tensor  # (n,) float64: p(true label), or the reference's mean per-token probability
    loss_sum: torch.Tensor  # (n,) float64: cross-entropy summed over the example's units
    units: torch.Tensor  # (n,) int64: 1 for classify, answer tokens for causal-lm
    predicted: torch.Tensor | None = None  # (n,) int64 classify: the predicted label


@dataclass
class Paired:
    base: Outcomes
    adapted: Outcomes
    kl_sum: torch.Tensor  # (n,) float64: KL(base ‖ adapted) summed over the example's units
    units: torch.Tensor  # (n,) int64

    @property
    def kl(self) -> torch.Tensor:
        """Per-example mean KL per unit (per token for causal-lm)."""
        return self.kl_sum / self.units.clamp_min(1)


@contextlib.contextmanager
def only(model: AdaptedModel, name: str | None):
    """Run exactly adapter ``name`` (None: the bare base) inside the block."""
    before = model.active
    if name is None:
        with model.base_only():
            yield
        return
    model.set_active(name)
    try:
        yield
    finally:
        model.set_active(*before)


def paired_pass(
    model: AdaptedModel, name: str, data: EvalSet, *, batch_size: int, pad_id: int, device: torch.device,
    autocast=None, progress: bool = False, desc: str = "",
) -> Paired:
    from tqdm import tqdm

    autocast = autocast or contextlib.nullcontext()
    base_parts: list[_Batch] = []
    adapted_parts: list[_Batch] = []
    kl_parts, unit_parts = [], []
    starts = range(0, len(data), batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(starts, desc=desc or data.source, unit="batch", disable=not progress, leave=False):
                batch = {k: v.to(device) for k, v in B.collate(data.encoded[start:start + batch_size], pad_id).items()}
                with only(model, None), autocast:
                    base_logits = _logits(model, batch)
                with only(model, name), autocast:
                    adapted_logits = _logits(model, batch)
                if data.task == "classify":
                    b, a, kl, units = _classify(base_logits, adapted_logits, batch["labels"])
                else:
                    b, a, kl, units = _causal(base_logits, adapted_logits, batch["labels"])
                base_parts.append(b)
                adapted_parts.append(a)
                kl_parts.append(kl)
                unit_parts.append(units)
    finally:
        model.train(was_training)
    units = torch.cat(unit_parts)
    return Paired(_join(base_parts, units), _join(adapted_parts, units), torch.cat(kl_parts), units)


_Batch = dict[str, torch.Tensor]


def _logits(model: AdaptedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _classify(base: torch.Tensor, adapted: torch.Tensor, labels: torch.Tensor):
    log_b, log_a = F.log_softmax(base.double(), -1), F.log_softmax(adapted.double(), -1)
    kl = (log_b.exp() * (log_b - log_a)).sum(-1)
    units = torch.ones_like(labels)

    def outcome(logp: torch.Tensor) -> _Batch:
        true = logp.gather(1, labels[:, None]).squeeze(1)
        predicted = logp.argmax(-1)
        return {"correct": predicted == labels, "loss_sum": -true, "predicted": predicted}

    return outcome(log_b), outcome(log_a), kl.cpu(), units.cpu()


def _causal(base: torch.Tensor, adapted: torch.Tensor, labels: torch.Tensor):
    """Scores at the answer positions only (labels shifted by one: position t predicts token t+1)."""
    targets = labels[:, 1:]
    keep = targets != B.IGNORE  # (rows, T-1)
    rows = keep.nonzero()[:, 0]
    picked_targets = targets[keep]
    log_b = F.log_softmax(base[:, :-1][keep], -1)  # (positions, vocab)
    log_a = F.log_softmax(adapted[:, :-1][keep], -1)
    n = labels.shape[0]
    units = torch.zeros(n, dtype=torch.long, device=labels.device).index_add_(0, rows, torch.ones_like(rows))
    kl_tokens = (log_b.exp() * (log_b - log_a)).sum(-1).double()
    kl = torch.zeros(n, dtype=torch.float64, device=labels.device).index_add_(0, rows, kl_tokens)

    def outcome(logp: torch.Tensor) -> _Batch:
        token_loss = -logp.gather(1, picked_targets[:, None]).squeeze(1).double()
        loss = torch.zeros(n, dtype=torch.float64, device=labels.device).index_add_(0, rows, token_loss)
        misses = (logp.argmax(-1) != picked_targets).long()
        wrong = torch.zeros(n, dtype=torch.long, device=labels.device).index_add_(0, rows, misses)
        return {"correct": (wrong == 0) & (units > 0), "loss_sum": loss}

    return outcome(log_b), outcome(log_a), kl.cpu(), units.cpu()


def _join(parts: list[_Batch], units: torch.Tensor) -> Outcomes:
    loss = torch.cat([p["loss_sum"].cpu() for p in parts])
    predicted = torch.cat([p["predicted"].cpu() for p in parts]) if "predicted" in parts[0] else None
    return Outcomes(
        correct=torch.cat([p["correct"].cpu() for p in parts]), prob=torch.exp(-loss / units.clamp_min(1)),
        loss_sum=loss, units=units, predicted=predicted,
    )


def greedy_answers(
    model: AdaptedModel, name: str | None, data: EvalSet, indices: list[int], tokenizer, *, device: torch.device,
    extra_tokens: int = 8, batch_size: int = 16,
) -> list[str]:
    """The greedy continuation of each listed example's prompt, decoded (causal-lm only).

    Prompts are left-padded and generated together, at most the reference's length plus
    ``extra_tokens`` new tokens: enough to show how an answer goes wrong, and bounded.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    answers: list[str] = []
    with torch.inference_mode(), only(model, name):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            prompts = [data.prompts[i] for i in chunk]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            limits = [len(data.encoded[i].input_ids) - len(data.prompts[i]) + extra_tokens for i in chunk]
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(limits), do_sample=False,
                                 pad_token_id=pad, eos_token_id=eos)
            for row, limit in zip(out[:, width:].tolist(), limits, strict=True):
                row = row[:limit]
                if eos is not None and eos in row:
                    row = row[:row.index(eos)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers
