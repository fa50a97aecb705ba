"""Tokenised examples and the deterministic order they are visited in.

Order is a pure function of (seed, epoch), so a resumed run visits exactly the batches an
uninterrupted run would, and every distributed rank knows the whole global batch of a step
(which lets the loss be normalised by the global count without communication).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.train import chat
from lorakit.train.data import ClassifyData, DataError, LMExample

IGNORE = -100  # label id that the loss skips


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int] | int  # per-token labels (causal LM) or one class id


def encode_text(tokenizer, text: str, max_length: int, special: bool = True) -> list[int]:
    if _is_hf(tokenizer):
        ids = tokenizer(text, add_special_tokens=special, truncation=True, max_length=max_length)["input_ids"]
        return list(ids)
    return tokenizer.encode(text)[:max_length]


def token_limit(requested: int, tokenizer) -> int:
    """``requested`` tokens, but no more than the tokenizer's own limit (the model's positions).
    HF tokenizers without a limit report 1e30."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return min(requested, limit)
    return requested


def _is_hf(tokenizer) -> bool:
    return type(tokenizer).__module__.startswith("transformers")


@dataclass
class Fit:
    """How a file's examples fit --max-length, counted so nothing is cut or dropped without a word."""

    examples: int = 0
    dropped: int = 0  # causal-lm: the prompt alone fills max_length, so there is nothing to learn
    truncated: int = 0  # cut at max_length (a cut answer has no end-of-sequence token: it is not taught to stop)

    def as_dict(self) -> dict[str, int]:
        return {"examples": self.examples, "dropped": self.dropped, "truncated": self.truncated}


# --max-length chosen from the data: the length this share of the training examples fits in
# whole, so one outlier does not set the memory every batch may need, and at most LONGEST_CHOSEN.
CHOSEN_PERCENTILE = 99
LONGEST_CHOSEN = 2048
UNCUT = 1 << 20  # "no limit" when encoding examples to measure them


@dataclass(frozen=True)
class LengthChoice:
    """The --max-length a run used and where it came from (printed, and kept in summary.json)."""

    tokens: int
    chosen_from_data: bool
    longest: int  # the longest training example, in tokens
    fitting: float  # the share of training examples that fit whole

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "from": "the data" if self.chosen_from_data else "--max-length",
                "longest": self.longest, "fitting": round(self.fitting, 4)}

    def line(self) -> str:
        share = f"{100 * self.fitting:.1f}% of training examples fit whole; the longest has {self.longest} tokens"
        if self.chosen_from_data:
            return (f"max length {self.tokens} tokens, chosen from the data ({share}); set --max-length to choose "
                    "another")
        return f"max length {self.tokens} tokens (--max-length; {share})"


def choose_length(lengths: Sequence[int], given: int | None, tokenizer) -> LengthChoice:
    """``given`` (capped at the tokenizer's limit), or the length the CHOSEN_PERCENTILE-th percentile
    of the training examples needs, capped at LONGEST_CHOSEN and the tokenizer's limit."""
    ordered = sorted(lengths)
    if given is not None:
        tokens = token_limit(given, tokenizer)
    else:
        rank = max(0, math.ceil(CHOSEN_PERCENTILE / 100 * len(ordered)) - 1)  # nearest rank
        tokens = token_limit(min(max(ordered[rank], 2), LONGEST_CHOSEN), tokenizer)
    fitting = sum(n <= tokens for n in ordered) / len(ordered)
    return LengthChoice(tokens, given is None, ordered[-1], fitting)


def encode_classification(data: ClassifyData, tokenizer, max_length: int, fit: Fit | None = None) -> list[Encoded]:
    return fit_classification(encode_classification_uncut(data, tokenizer), data, tokenizer, max_length, fit)


def encode_classification_uncut(data: ClassifyData, tokenizer) -> list[Encoded]:
    return [Encoded(encode_text(tokenizer, t, UNCUT), label) for t, label in zip(data.texts, data.labels, strict=True)]


def fit_classification(encoded: list[Encoded], data: ClassifyData, tokenizer, max_length: int,
                       fit: Fit | None = None) -> list[Encoded]:
    """Texts longer than ``max_length`` encoded again at that limit (the tokenizer keeps its closing
    special tokens, which cutting the ids would lose); counted in ``fit``."""
    cut = [i for i, e in enumerate(encoded) if len(e.input_ids) > max_length]
    if fit is not None:
        fit.examples += len(encoded)
        fit.truncated += len(cut)
    encoded = list(encoded)
    for i in cut:
        encoded[i] = Encoded(encode_text(tokenizer, data.texts[i], max_length), data.labels[i])
    return encoded


def encode_lm(examples: Sequence[LMExample], tokenizer, max_length: int, source: str,
              fit: Fit | None = None) -> list[Encoded]:
    """Context tokens carry no loss; answer tokens (and the end-of-sequence token) do."""
    return fit_lm(encode_lm_uncut(examples, tokenizer), max_length, source, fit)


def encode_lm_uncut(examples: Sequence[LMExample], tokenizer) -> list[Encoded]:
    return [_encode_example(ex, tokenizer) for ex in examples]


def _encode_example(example: LMExample, tokenizer) -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    last = len(example.pieces) - 1
    for k, piece in enumerate(example.pieces):
        if k == 0:
            part = prompt_ids(tokenizer, piece.text, UNCUT, example.special_tokens) if piece.text else _bos(tokenizer)
        else:
            part = encode_text(tokenizer, piece.text, UNCUT, special=False)
        closed_by_template = not example.special_tokens and tokenizer.eos_token_id in part
        if k == last and not closed_by_template:
            part = [*part, tokenizer.eos_token_id]  # the model is taught to stop
        ids += part
        labels += part if piece.answer else [IGNORE] * len(part)
    return Encoded(ids, labels)


def fit_lm(encoded: Sequence[Encoded], max_length: int, source: str, fit: Fit | None = None) -> list[Encoded]:
    """Examples cut at ``max_length``; those left with no answer token are dropped. Both counted in ``fit``."""
    fit = fit if fit is not None else Fit()
    kept = []
    for example in encoded:
        fit.examples += 1
        labels = example.labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            fit.dropped += 1  # the prompt alone fills max_length: nothing to learn from this example
            continue
        fit.truncated += len(example.input_ids) > max_length
        kept.append(Encoded(example.input_ids[:max_length], labels))
    if not kept:
        raise DataError(f"{source}: no example has answer tokens within max_length={max_length}")
    return kept


def prompt_ids(tokenizer, text: str, max_length: int, special: bool = True) -> list[int]:
    """A prompt's token ids, as training and serving both see it. ``special=False`` for text a chat
    template rendered: the template writes its special tokens itself, as transformers assumes. A
    double BOS at the start (a tokenizer that adds one before a template's ``{{ bos_token }}``) is
    always cut to one."""
    ids = encode_text(tokenizer, text, max_length, special=special)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        return ids[1:]
    return ids


def chat_prompt_ids(tokenizer, messages: Sequence[dict[str, Any]], max_length: int,
                    template: str | None = None) -> list[int]:
    """The prompt of a chat (the generation prompt for the assistant's turn), rendered with
    ``template`` (the one an adapter was trained with), the tokenizer's or lorakit's default, and
    tokenized piece by piece exactly as training tokenizes its chat examples
    (:mod:`lorakit.train.chat`); what the server feeds the model."""
    special = not chat.has_template(tokenizer, template)
    ids: list[int] = []
    for k, piece in enumerate(chat.prompt_pieces(tokenizer, messages, template)):
        ids += (prompt_ids(tokenizer, piece.text, UNCUT, special) if k == 0
                else encode_text(tokenizer, piece.text, UNCUT, special=False))
    return ids[:max_length]


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask and labels."""
    longest = max(len(i.input_ids) for i in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    token_labels = not isinstance(items[0].labels, int)
    labels = torch.full((len(items), longest), IGNORE, dtype=torch.long) if token_labels else torch.empty(
        len(items), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        mask[row, :n] = 1
        if token_labels:
            labels[row, :n] = torch.tensor(item.labels)
        else:
            labels[row] = item.labels
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_units(items: Sequence[Encoded]) -> int:
    """What the loss averages over: examples for classification, answer tokens for a causal LM.

    A causal LM predicts token t+1 from token t, so the first label of each row is never used.
    """
    if isinstance(items[0].labels, int):
        return len(items)
    return sum(sum(1 for label in i.labels[1:] if label != IGNORE) for i in items)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def step_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based); the last batch of an epoch may be short."""
    per_epoch = steps_per_epoch(n, batch_size)
    epoch, position = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch)
    return order[position * batch_size:(position + 1) * batch_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def split_for(indices: list[int], accumulation: int, rank: int, world: int) -> list[list[int]]:
    """Micro-batches of this rank: the step batch cut into ``accumulation`` chunks, each strided by rank."""
    size = -(-len(indices) // accumulation)
    chunks = [indices[i:i + size] for i in range(0, len(indices), size)]
    return [chunk[rank::world] for chunk in chunks]
