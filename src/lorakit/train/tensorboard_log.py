"""TensorBoard event files beside metrics.jsonl (``--log tensorboard``), written by torch's own
writer, so a run shows up in the TensorBoard users already have open next to their other runs.

metrics.jsonl stays the record lorakit reads back; the event files are a view of the same rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

LOG_DIR = "tensorboard"  # inside the run folder
TRAIN_KEYS = ("loss", "lr")  # per step; everything else is measured at evaluations


def check_available() -> None:
    """Before any work: torch's SummaryWriter needs the tensorboard package."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as exc:
        raise ConfigError("--log tensorboard needs the tensorboard package: "
                          "pip install 'lorakit[tensorboard]'") from exc


class TensorBoardLog:
    """Scalars of every metrics row under train/ (loss, lr) and eval/ (the metric, general text)."""

    def __init__(self, run_folder: Path, resumed_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops what the interrupted one logged after its checkpoint, as metrics.jsonl does
        purge = resumed_step + 1 if resumed_step is not None else None
        self.writer = SummaryWriter(log_dir=str(run_folder / LOG_DIR), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        evaluated = False
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            evaluated = evaluated or key not in TRAIN_KEYS
            self.writer.add_scalar(f"{'train' if key in TRAIN_KEYS else 'eval'}/{key}", value, step)
        if evaluated:  # evaluations are rare: make them visible at once, and safe from a Ctrl-C
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
