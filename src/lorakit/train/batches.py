"""Tokenised examples and the deterministic order they are visited in.

Order is a pure function of (seed, epoch), so a resumed run visits exactly the batches an
uninterrupted run would, and every distributed rank knows the whole global batch of a step
(which lets the loss be normalised by the global count without communication).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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


def encode_classification(data: ClassifyData, tokenizer, max_length: int, fit: Fit | None = None) -> list[Encoded]:
    encoded = [Encoded(encode_text(tokenizer, t, max_length), label) for t, label in zip(data.texts, data.labels,
                                                                                           strict=True)]
    if fit is not None:  # a text that reaches the limit was (almost always) cut there
        fit.examples += len(encoded)
        fit.truncated += sum(len(e.input_ids) >= max_length for e in encoded)
    return encoded


def encode_lm(examples: Sequence[LMExample], tokenizer, max_length: int, source: str,
              fit: Fit | None = None) -> list[Encoded]:
    """Prompt tokens carry no loss; completion tokens (and the end-of-sequence token) do."""
    fit = fit if fit is not None else Fit()
    encoded = []
    for ex in examples:
        fit.examples += 1
        prompt = prompt_ids(tokenizer, ex.prompt, max_length, ex.special_tokens) if ex.prompt else _bos(tokenizer)
        answer = [*encode_text(tokenizer, ex.completion, max_length, special=False), tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        labels = ([IGNORE] * len(prompt) + answer)[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            fit.dropped += 1  # the prompt alone fills max_length: nothing to learn from this example
            continue
        fit.truncated += len(prompt) + len(answer) > max_length
        encoded.append(Encoded(ids, labels))
    if not encoded:
        raise DataError(f"{source}: no example has answer tokens within max_length={max_length}")
    return encoded


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


def chat_prompt_ids(tokenizer, messages: Sequence[dict[str, Any]], max_length: int) -> list[int]:
    """The prompt of a chat (the generation prompt for the assistant's turn), rendered with the
    tokenizer's template or lorakit's default; what the server feeds the model, and what training's
    chat prompts are."""
    from lorakit.train.data import DEFAULT_CHAT_TEMPLATE

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return prompt_ids(tokenizer, text, max_length, special=False)
    text = "".join(DEFAULT_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
    return prompt_ids(tokenizer, text + "<|assistant|>\n", max_length)


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
