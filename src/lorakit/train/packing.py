"""Sequence packing for causal-LM training (``lorakit train --pack``).

A micro-batch of variable-length examples, right-padded to its longest, spends much of its
compute on padding. Packing lays the same examples end to end into rows of at most
``max_length`` tokens (first-fit decreasing), so fewer, fuller rows carry the same tokens.

Packing changes the layout only, never what is computed, so a packed step's loss and gradients
equal the unpacked step's on the same examples (up to float rounding):

- attention stays inside each example: a block-diagonal causal mask (batch, 1, q, k) is passed
  to the model, and position ids restart at 0 for each example, so every example's logits are
  its unpacked logits;
- the first label of every example is ignored, as in an unpacked row (where it has no previous
  token), so no example's first token is predicted from the previous example's last token, and
  the loss counts exactly the answer tokens :func:`lorakit.train.batches.loss_units` counts.

Which examples form a step (and a micro-batch) is unchanged: packing acts inside one
micro-batch, so resume, gradient accumulation and the distributed split stay exactly as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train import batches as B

# Attention implementations whose mask transformers takes as given when it is 4D, and the kind of
# mask each wants: SDPA reads booleans (True = attend), eager attention adds the mask to its scores.
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of indices into ``lengths``, each row's lengths summing to at most ``capacity``.

    Longest first, each into the first row it fits (ties keep their order, so the layout is a
    pure function of the lengths). First-fit decreasing uses at most 11/9 of the optimal number
    of rows plus one, and is cheap next to a forward pass."""
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(f"an example of {too_long[0]} tokens cannot fit a packed row of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def pack(items: Sequence[B.Encoded], max_length: int, pad_id: int, mask: str = "bool",
         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The packed tensors of one micro-batch: input_ids, labels, position_ids (rows, width) and
    attention_mask (rows, 1, width, width), ``mask`` "bool" (True = attend) or "additive" (0 or
    the lowest ``dtype`` value). The padding after a row's last example is a segment of its own,
    so every query attends to at least itself (a fully masked query would give NaN)."""
    if any(isinstance(i.labels, int) for i in items):
        raise ConfigError("--pack packs causal-LM examples; classification has one label per example")
    rows = first_fit_decreasing([len(i.input_ids) for i in items], max_length)
    width = max(sum(len(items[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), B.IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s, i in enumerate(row):
            item = items[i]
            end = start + len(item.input_ids)
            ids[r, start:end] = torch.tensor(item.input_ids)
            # the first label is never a target: in an unpacked row nothing precedes it
            labels[r, start + 1:end] = torch.tensor(item.labels[1:], dtype=torch.long)
            positions[r, start:end] = torch.arange(end - start)
            segments[r, start:end] = s
            start = end
        positions[r, start:] = torch.arange(width - start)
        segments[r, start:] = len(row)
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "attention_mask": block_causal_mask(segments, mask, dtype)}


def block_causal_mask(segments: torch.Tensor, mask: str = "bool", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, 1, width, width): query q may see key k when both lie in one segment and k ≤ q."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    allowed = allowed[:, None]
    if mask == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def layout_size(lengths: Sequence[int], max_length: int | None) -> int:
    """Token positions a micro-batch of these example lengths occupies: rows × width, packed into
    rows of ``max_length``, or (None) right-padded to the longest."""
    if not lengths:
        return 0
    if max_length is None:
        return len(lengths) * max(lengths)
    rows = first_fit_decreasing(lengths, max_length)
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def step_tokens(train: Sequence[B.Encoded], indices: list[int], accumulation: int, world: int,
                max_length: int | None) -> tuple[int, int]:
    """(real tokens, token positions incl. padding) of one optimizer step over every rank: each
    rank knows every rank's micro-batches, so the count needs no communication."""
    tokens = sum(len(train[i].input_ids) for i in indices)
    positions = 0
    for rank in range(world):
        for chunk in B.split_for(indices, accumulation, rank, world):
            positions += layout_size([len(train[i].input_ids) for i in chunk], max_length)
    return tokens, positions


@dataclass(frozen=True)
class Packer:
    """Packs micro-batches for one model, with the mask kind its attention reads."""

    max_length: int
    pad_id: int
    mask: str = "bool"
    dtype: torch.dtype = torch.float32

    @classmethod
    def for_model(cls, model: nn.Module, max_length: int, pad_id: int) -> Packer:
        """A packer for ``model``, or a ConfigError naming the model type when its attention cannot
        keep packed examples apart: an attention implementation that does not take a 4D mask, a
        forward without position ids, or a probe in which one example's logits change with
        another example's tokens or place in the row."""
        inner = _hf_model(model)
        config = getattr(inner, "config", None)
        kind = getattr(config, "model_type", None) or type(inner).__name__
        implementation = getattr(config, "_attn_implementation", None)
        if implementation not in MASK_KINDS:
            raise ConfigError(
                f"--pack needs attention that takes a custom mask ({' or '.join(MASK_KINDS)}); this {kind} model "
                f"uses {implementation or 'no such attention'}; train without --pack")
        if "position_ids" not in inspect.signature(inner.forward).parameters:
            raise ConfigError(f"--pack restarts position ids at each example, but this {kind} model's forward takes "
                              "no position_ids; train without --pack")
        floating = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        packer = cls(max_length, pad_id, MASK_KINDS[implementation], torch.promote_types(floating, torch.float32))
        packer.probe(model, kind, int(getattr(config, "vocab_size", 0) or 16))
        return packer

    def batch(self, items: Sequence[B.Encoded]) -> dict[str, torch.Tensor]:
        return pack(items, self.max_length, self.pad_id, self.mask, self.dtype)

    @torch.no_grad()
    def probe(self, model: nn.Module, kind: str, vocab: int) -> None:
        """Run two tiny packed rows and check that example B's logits do not depend on the tokens
        of the example before it (attention isolation) nor on its place in the row (positions)."""
        first = [1 + i % (vocab - 1) for i in range(4)]
        other = [1 + (i + 4) % (vocab - 1) for i in range(4)]
        probe = [1 + (i + 8) % (vocab - 1) for i in range(4)]
        was_training = model.training
        model.eval()
        try:
            after_first = self._probe_logits(model, first, probe)[:, 4:]
            after_other = self._probe_logits(model, other, probe)[:, 4:]
            in_front = self._probe_logits(model, probe, first)[:, :4]
        finally:
            model.train(was_training)
        # Isolated attention gives the same logits up to rounding; a leak moves them by far more. A bf16
        # model rounds each hidden state to 3 digits, so its bound is wider.
        tolerance = max(1e-3, 10 * torch.finfo(after_first.dtype).eps) * (after_first.abs().max().item() + 1e-6)
        after_first, after_other, in_front = after_first.float(), after_other.float(), in_front.float()
        if (after_first - after_other).abs().max().item() > tolerance:
            raise ConfigError(f"--pack: this {kind} model's attention does not keep packed examples apart (one "
                              "example's logits changed with another's tokens); train without --pack")
        if (after_first - in_front).abs().max().item() > tolerance:
            raise ConfigError(f"--pack: this {kind} model does not restart positions at each packed example (one "
                              "example's logits changed with its place in the row); train without --pack")

    def _probe_logits(self, model: nn.Module, a: list[int], b: list[int]) -> torch.Tensor:
        device = next(model.parameters()).device
        # one row, whatever --max-length is; equal lengths keep a first
        batch = pack([B.Encoded(a, a), B.Encoded(b, b)], len(a) + len(b), self.pad_id, self.mask, self.dtype)
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        out = model(**batch)
        return out.logits if hasattr(out, "logits") else out[0]


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside lorakit's wrapper (it has the config and the forward)."""
    from lorakit.model import AdaptedModel

    return model.model if isinstance(model, AdaptedModel) else model
