"""Forgetting on general text: what fine-tuning did to a model away from its task.

Measured the way PEFT reports it: a causal LM's mean per-token cross-entropy on general text
(labels shifted by one, padding ignored), after minus before, in nats; "before" is the same
model with its adapters disabled (``with adapted.base_only():``) or, for a full fine-tune, the
model before its first step. An encoder has no next-token loss, so its forgetting is the drift of
its mean-pooled last hidden states: the mean cosine between the embeddings before and after.

``measure_general`` runs one model once and keeps per-passage figures (not just the mean), so
"before" can be stored, compared with any number of "after"s and compared passage by passage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train.batches import encode_text


@dataclass(frozen=True)
class GeneralMeasure:
    """What one model does on the general-text passages."""

    loss_sums: torch.Tensor | None  # (passages,) float64: summed next-token cross-entropy of each passage (causal LMs)
    token_counts: torch.Tensor | None  # (passages,) int64: tokens predicted in each passage
    embeddings: torch.Tensor | None  # (passages, hidden) float32: mean-pooled last hidden state (encoders)

    @property
    def is_causal_lm(self) -> bool:
        return self.loss_sums is not None

    def as_dict(self) -> dict[str, torch.Tensor | None]:
        """Plain tensors, for a checkpoint that must load without this class."""
        return {"loss_sums": self.loss_sums, "token_counts": self.token_counts, "embeddings": self.embeddings}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GeneralMeasure:
        return cls(values.get("loss_sums"), values.get("token_counts"), values.get("embeddings"))


def measure_general(
    model: nn.Module,
    tokenizer,
    passages: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    autocast=None,
    progress: bool = False,
) -> GeneralMeasure:
    """Run ``model`` over ``passages`` (right-padded batches, no gradients, eval mode).

    A model whose output ``logits`` are 3-D (batch × tokens × vocab) is a causal LM: each
    passage gets its summed next-token cross-entropy, from float32 logits, summed in float64.
    Anything else (an encoder, a sequence classifier) gets its last hidden state mean-pooled
    over the attention mask. ``autocast`` is a context manager entered around each forward
    (e.g. ``torch.autocast("cuda", torch.bfloat16)``). The model's training flag is restored.
    """
    if not passages:
        raise ConfigError("measure_general needs at least one passage")
    if batch_size < 1 or max_length < 2:
        raise ConfigError(f"batch_size must be at least 1 and max_length at least 2, got {batch_size}, {max_length}")
    device = torch.device(device) if device is not None else _device_of(model)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    encoded = [encode_text(tokenizer, text, max_length) for text in passages]
    starts = range(0, len(encoded), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="general text", unit="batch", dynamic_ncols=True)
    losses, counts, embeddings = [], [], []
    was_training = model.training
    model.eval()
    try:
        with no_autograd(model):
            for start in starts:
                ids, mask = _padded(encoded[start:start + batch_size], pad_id, device)
                with autocast if autocast is not None else contextlib.nullcontext():
                    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                logits = getattr(out, "logits", None)
                if logits is not None and logits.dim() == 3:
                    loss, count = _passage_losses(logits, ids, mask)
                    losses.append(loss.cpu())
                    counts.append(count.cpu())
                else:
                    embeddings.append(_pooled(out, mask).cpu())
    finally:
        model.train(was_training)
    if losses and embeddings:  # cannot happen with one model, but a mixed result would compare wrongly
        raise ConfigError("the model returned token logits for some batches and none for others")
    if losses:
        return GeneralMeasure(torch.cat(losses), torch.cat(counts), None)
    return GeneralMeasure(None, None, torch.cat(embeddings))


def compare_general(before: GeneralMeasure, after: GeneralMeasure) -> dict[str, float]:
    """Forgetting from ``before`` to ``after``, both measured on the same passages.

    Causal LMs: ``nats_before``, ``nats_after`` (token-weighted mean cross-entropy over all
    passages) and ``forgetting_nats`` = after − before (positive: general text got harder).
    Encoders: ``embedding_cosine`` (mean over passages of the cosine between the two pooled
    embeddings; 1.0 when nothing moved) and ``embedding_drift`` = 1 − cosine.
    """
    if before.is_causal_lm != after.is_causal_lm:
        raise ConfigError("cannot compare a causal LM's measure with an encoder's")
    if before.is_causal_lm:
        if not torch.equal(before.token_counts, after.token_counts):
            raise ConfigError("the two measures were taken on different passages or tokenisations "
                              f"({int(before.token_counts.sum())} vs {int(after.token_counts.sum())} tokens)")
        tokens = max(int(before.token_counts.sum()), 1)
        nats_before = float(before.loss_sums.sum()) / tokens
        nats_after = float(after.loss_sums.sum()) / tokens
        return {"nats_before": nats_before, "nats_after": nats_after, "forgetting_nats": nats_after - nats_before}
    if before.embeddings.shape != after.embeddings.shape:
        raise ConfigError(f"the two measures differ in shape: {tuple(before.embeddings.shape)} vs "
                          f"{tuple(after.embeddings.shape)}")
    cosine = float(_row_cosines(before.embeddings, after.embeddings).mean())
    return {"embedding_cosine": cosine, "embedding_drift": 1.0 - cosine}


# -- internals --------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _padded(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def _passage_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of token t+1 given tokens ≤ t, per row; padded targets carry none."""
    shifted = logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    per_token = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                reduction="none").view(targets.shape)
    return per_token.double().sum(1), (targets != -100).sum(1).to(torch.int64)


def _pooled(out, mask: torch.Tensor) -> torch.Tensor:
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        states = getattr(out, "hidden_states", None)
        if not states:
            raise ConfigError("the model's output has neither 3-D token logits nor hidden states; "
                              "measure_general needs a causal LM, an encoder or a model that returns hidden_states")
        hidden = states[-1]
    weights = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per row in float64; identical rows give exactly 1.0 (sqrt of a correctly rounded square)."""
    a, b = a.double(), b.double()
    dot = (a * b).sum(1)
    norms = ((a * a).sum(1) * (b * b).sum(1)).sqrt()
    both_zero = norms == 0
    return torch.where(both_zero, torch.ones_like(dot), dot / norms.clamp_min(torch.finfo(torch.float64).tiny)).clamp(
        -1.0, 1.0)


__all__ = ["GeneralMeasure", "compare_general", "measure_general"]


def no_autograd(model: nn.Module):
    """inference_mode, except for a model sharded by FSDP (``lorakit train --shard``): FSDP reuses
    the buffers it gathers weights into across passes, and tensors made under inference_mode
    cannot be written to outside it, so a later training step would fail."""
    from torch.distributed.fsdp import FSDPModule

    return torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode()
