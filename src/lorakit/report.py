"""Trainable-parameter reports: PEFT's one-line summary and a per-module table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from lorakit.model import AdaptedModel


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over unique parameters, as PEFT counts them."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        # bitsandbytes 4-bit weights pack two values per byte; count the values they hold.
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def summary_line(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"


def module_table(model: AdaptedModel) -> str:
    """One row per (module, adapter): kind, method, rank, scaling, trainable parameters."""
    rows = [("module", "adapter", "kind", "method", "rank", "scaling", "trainable")]
    for path, layer in model.adapted_layers().items():
        for name, method in layer.adapters.items():
            params = sum(p.numel() for p in method.parameters(recurse=False) if p.requires_grad)
            rows.append((path, name, layer.kind.name, method.method_name, str(method.rank),
                         f"{method.scaling:g}", f"{params:,d}"))
    for path, saved in model.saved_modules().items():
        for name, copy in saved.copies.items():
            params = sum(p.numel() for p in copy.parameters() if p.requires_grad)
            rows.append((path, name, type(saved.original).__name__, "full copy", "-", "-", f"{params:,d}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [_format_row(row, widths) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format_row(row: tuple[str, ...], widths: list[int]) -> str:
    """Text columns left-aligned, number columns (from the fifth on) right-aligned."""
    cells = zip(row, widths, strict=True)
    return "  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(cells))
