"""Decoding state of a running generation: one row per request, and the batch they share.

A :class:`Row` samples its tokens and hands out text as it becomes safe to send (see
:func:`stop_scan`); a :class:`DecodeBatch` holds the rows' next inputs, attention mask, positions
and KV cache. :func:`merge_batches` joins newly prefilled rows to a running batch (continuous
batching) by left-padding the shorter cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lorakit.serve.jobs import Delta, Finished, GenerationJob

if TYPE_CHECKING:
    from lorakit.serve.engine import Engine


def stop_scan(text: str, stops: tuple[str, ...], final: bool = False) -> tuple[int | None, int]:
    """(where the earliest stop string starts or None, how much of ``text`` is safe to send).

    Trailing U+FFFD (an unfinished UTF-8 character so far) may still change, so until ``final``
    it is neither searched for stops nor sent; text that could still grow into a stop string
    (a suffix that is a prefix of one) is held back too.
    """
    stable = text if final else text.rstrip("\ufffd")
    hits = [i for i in (stable.find(s) for s in stops) if i >= 0]
    if hits:
        return min(hits), min(hits)
    safe = len(stable)
    for s in stops:
        for k in range(min(len(s) - 1, len(stable)), 0, -1):
            if stable.endswith(s[:k]):
                safe = min(safe, len(stable) - k)
                break
    return None, safe


class Row:
    def __init__(self, job: GenerationJob, engine: Engine) -> None:
        self.job, self.engine = job, engine
        self.ids: list[int] = []
        self.sent = 0
        p = job.params
        self.generator = None
        if p.temperature > 0:
            self.generator = torch.Generator()
            if p.seed is not None:
                self.generator.manual_seed(p.seed)
            else:
                self.generator.seed()

    def choose(self, logits: torch.Tensor) -> int:
        """Sample one token from this row's logits (float32, vocabulary sized)."""
        p = self.job.params
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
            sorted_p[before >= p.top_p] = 0.0  # keeps at least the most likely token
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def step(self, token: int) -> bool:
        """Take one generated token; False when the row has finished."""
        p = self.job.params
        ended = token in self.engine.eos_ids
        if not ended:
            self.ids.append(token)
        last = ended or len(self.ids) >= p.max_tokens
        text = self._text()
        cut, safe = stop_scan(text, p.stop, final=last)
        if cut is not None:
            return self._finish("stop", text[:cut])
        if last:
            return self._finish("stop" if ended else "length", text)
        if safe > self.sent:
            self.job.emit(Delta(text[self.sent:safe]))
            self.sent = safe
        return True

    def _text(self) -> str:
        return self.engine.decode(self.ids)

    def _finish(self, reason: str, text: str) -> bool:
        if len(text) > self.sent:
            self.job.emit(Delta(text[self.sent:]))
        self.job.emit(Finished(reason, len(self.job.prompt_ids), len(self.ids)))
        return False


@dataclass
class DecodeBatch:
    """Rows being decoded together: the next input ids (b, t), the attention mask over cache +
    input (b, cache + t), the input's positions (b, t) and the KV cache (None before prefill)."""

    rows: list[Row]
    ids: torch.Tensor
    mask: torch.Tensor
    position: torch.Tensor
    cache: Any


def mergeable(cache) -> bool:
    """Caches made only of plain dynamic layers can be padded and concatenated along the batch."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" and layer.keys is not None for layer in layers)


def merge_batches(running: DecodeBatch, joining: DecodeBatch | None) -> DecodeBatch:
    """One batch from two: the shorter cache is left-padded (masked out), then rows are stacked."""
    if joining is None:  # every new row finished on its first token
        return running
    if not mergeable(joining.cache) or len(joining.cache.layers) != len(running.cache.layers):
        raise RuntimeError("cannot merge KV caches of different structure")
    width = max(running.mask.shape[1], joining.mask.shape[1])

    def pad(batch: DecodeBatch) -> tuple[int, torch.Tensor]:
        extra = width - batch.mask.shape[1]
        return extra, torch.nn.functional.pad(batch.mask, (extra, 0))

    extra_a, mask_a = pad(running)
    extra_b, mask_b = pad(joining)
    for a, b in zip(running.cache.layers, joining.cache.layers, strict=True):
        a.keys = torch.cat([torch.nn.functional.pad(a.keys, (0, 0, extra_a, 0)),
                            torch.nn.functional.pad(b.keys, (0, 0, extra_b, 0))])
        a.values = torch.cat([torch.nn.functional.pad(a.values, (0, 0, extra_a, 0)),
                              torch.nn.functional.pad(b.values, (0, 0, extra_b, 0))])
    return DecodeBatch(running.rows + joining.rows, torch.cat([running.ids, joining.ids]), torch.cat([mask_a, mask_b]),
                  torch.cat([running.position, joining.position]), running.cache)


def trim_left_padding(mask: torch.Tensor, cache) -> tuple[torch.Tensor, Any]:
    """Drop leading columns no remaining row attends to (after long prompts have finished)."""
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else 0
    layers = getattr(cache, "layers", None)
    if first == 0 or not layers or not all(type(layer).__name__ == "DynamicLayer" for layer in layers):
        return mask, cache
    for layer in layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., first:, :]
            layer.values = layer.values[..., first:, :]
    return mask[:, first:], cache
