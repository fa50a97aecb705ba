"""Training checkpoints that resume exactly.

A checkpoint holds everything the next step depends on: the trained tensors (adapter
parameters and buffers such as Delta-LoRA's shift, or every weight for a full fine-tune), the
optimizer and scheduler, the RNG states, the step (which fixes the data position), early-stopping
state and any training rule's state. It is written to a temporary file and renamed, so a kill
at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lorakit.io.atomic import write_atomically

NAME = re.compile(r"^step-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, payload: dict[str, Any], keep_last: int) -> Path:
    """Write ``step-<step>.pt`` atomically, then drop all but the newest ``keep_last``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    write_atomically(path, lambda tmp: torch.save({**payload, "step": step, "rng": rng_state()}, tmp))
    for old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files are not listed)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_latest(folder: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads; a damaged newest one falls back to the one before."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a damaged file: try the previous one
            continue
    return None


def clear(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
