"""What a run writes: resolved config, metrics.jsonl, curves.png, checkpoints, the adapter, summary.json.

Only rank 0 writes. Nothing is written before every input has been checked, and a folder that
holds another run is refused unless the user asks to resume it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.io.atomic import write_atomically, write_text_atomically
from lorakit.train.config import TrainConfig
from lorakit.train.models import name_for_files

GENERAL_CURVES = {"forgetting_nats": "forgetting on general text (nats)",
                  "embedding_cosine": "general-text embedding cosine"}


def general_text(summary: dict[str, Any]) -> str:
    """The printed summary's forgetting figure, for the saved (best) model; empty when it was not measured."""
    general = summary.get("general") or {}
    if "forgetting_nats" in general:
        return f" | general text {general['forgetting_nats']:+.4f} nats ({general['nats_after']:.3f} per token)"
    if "embedding_cosine" in general:
        return f" | general-text embedding cosine {general['embedding_cosine']:.4f}"
    return ""


def token_text(summary: dict[str, Any]) -> str:
    """The printed summary's tokens per second and padding share (empty when not counted)."""
    rate, padding = summary.get("tokens_per_second"), summary.get("padding_share")
    if rate is None:
        return ""
    return f", {rate:.0f} tokens/s ({100 * padding:.0f}% padding)"


class RunOutputs:
    def __init__(self, folder: Path, enabled: bool) -> None:
        self.folder = folder
        self.enabled = enabled
        self.checkpoints = folder / "checkpoints"
        self.metrics_path = folder / "metrics.jsonl"
        self.adapter_dir = folder / "adapter"
        self.max_length_used: int | None = None  # the --max-length examples were cut at (set by the trainer)
        self.tensorboard = None  # --log tensorboard: the event-file writer

    def check_fresh_or_resume(self, resume: bool) -> None:
        if not resume and (self.checkpoints.exists() or (self.folder / "summary.json").exists()):
            raise ConfigError(f"{self.folder} already holds a run; pass --resume to continue it, or another --out")

    def start(self, config: TrainConfig, resumed_step: int | None) -> None:
        if not self.enabled:
            return
        import yaml

        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.folder / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        if config.log == "tensorboard":
            from lorakit.train.tensorboard_log import TensorBoardLog

            self.tensorboard = TensorBoardLog(self.folder, resumed_step)
        if resumed_step is None:
            self.metrics_path.write_text("")
        else:  # drop what the interrupted run logged after its last checkpoint
            kept = [line for line in self._lines() if json.loads(line)["step"] <= resumed_step]
            write_text_atomically(self.metrics_path, "".join(line + "\n" for line in kept))

    def _lines(self) -> list[str]:
        if not self.metrics_path.exists():
            return []
        return [line for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def metric(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                self.tensorboard.write(record)

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def progress_note(self, text: str, quiet: bool) -> None:
        """A line printed above the progress bar (an evaluation as it happens)."""
        if self.enabled and not quiet:
            from tqdm import tqdm

            tqdm.write(text)

    def progress(self, total: int, done: int, quiet: bool):
        from tqdm import tqdm

        return tqdm(total=total, initial=done, disable=quiet, desc="train", unit="step", dynamic_ncols=True)

    def save_model(self, prepared, config: TrainConfig) -> int:
        """The adapter in PEFT's layout (or the whole model for full / head baselines); its size in bytes."""
        import lorakit

        labels = prepared.label_names
        if prepared.adapted is not None:
            # The label names travel with the adapter, so `lorakit merge` and `lorakit serve` can
            # answer "positive" rather than "1".
            metadata = {"quantize": config.quantize, "task": config.task}
            if labels:
                metadata["label_names"] = list(labels)
            lorakit.save_adapter(prepared.adapted, self.adapter_dir,
                                 base_model_name_or_path=name_for_files(config.model),
                                 extra_metadata=metadata)
            if config.chat_template:  # eval, generate and serve read the adapter's chats as training did
                from lorakit.train.chat import TEMPLATE_FILE

                write_text_atomically(self.adapter_dir / TEMPLATE_FILE, prepared.tokenizer.chat_template)
            return (self.adapter_dir / "adapter_model.safetensors").stat().st_size
        if labels and hasattr(prepared.model, "config"):
            prepared.model.config.id2label = dict(enumerate(labels))
            prepared.model.config.label2id = {name: i for i, name in enumerate(labels)}
        target = self.folder / "model"
        prepared.model.save_pretrained(target)
        return sum(p.stat().st_size for p in target.glob("*.safetensors"))

    def finish(self, summary: dict[str, Any], metric_name: str) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        write_text_atomically(self.folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.plot(metric_name)
        before, after = summary["metric_before"], summary["metric_after"]
        print(
            f"{metric_name}: {before:.4f} → {after:.4f} | trainable {summary['trainable_params']:,d} of "
            f"{summary['total_params']:,d} | adapter {summary['adapter_bytes'] / 1024:.1f} KiB | "
            f"{summary['seconds']:.1f} s, {summary['examples_per_second']:.1f} examples/s{token_text(summary)}"
            f"{general_text(summary)} | "
            f"{self.folder}",
            flush=True,
        )
        line = fit_line(summary.get("data") or {}, self.max_length_used)
        if line:
            print(line, flush=True)
        saved = self.adapter_dir if (self.adapter_dir / "adapter_config.json").is_file() else self.folder / "model"
        print(f"saved: the evaluation of step {summary['best_step']} ({metric_name} {after:.4f}) → {saved}", flush=True)
        for warning in summary.get("warnings", []):
            print(f"warning: {warning}", flush=True)

    def plot(self, metric_name: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in self._lines()]
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
        metrics = [(r["step"], r[metric_name]) for r in records if metric_name in r]
        general_key = next((k for k in GENERAL_CURVES if any(k in r for r in records)), None)
        rates = [(r["step"], r["lr"]) for r in records if "lr" in r]
        # above: learning (training loss, the evaluation metric); below: the lr schedule and forgetting
        fig, (left, below) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
        if rates:
            below.plot(*zip(*rates, strict=True), color="tab:grey", lw=1, ls="--")
        below.set_ylabel("learning rate", color="tab:grey")
        below.set_xlabel("step")
        if general_key is not None:
            general = [(r["step"], r[general_key]) for r in records if general_key in r]
            forgetting = below.twinx()
            forgetting.plot(*zip(*general, strict=True), color="tab:green", marker="o")
            forgetting.set_ylabel(GENERAL_CURVES[general_key], color="tab:green")
        if losses:
            left.plot(*zip(*losses, strict=True), color="tab:blue", lw=1, label="training loss")
        left.set_ylabel("training loss", color="tab:blue")
        if metrics:
            right = left.twinx()
            right.plot(*zip(*metrics, strict=True), color="tab:red", marker="o", label=f"eval {metric_name}")
            if metric_name == "perplexity":  # on a log scale its curve is the eval loss's
                right.set_yscale("log")
                right.set_ylabel("eval perplexity (log scale: eval loss)", color="tab:red")
            else:
                right.set_ylabel(f"eval {metric_name}", color="tab:red")
        fig.tight_layout()
        write_atomically(self.folder / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


def fit_line(data: dict[str, dict[str, int]], max_length: int | None) -> str | None:
    """One line saying which examples were cut or dropped at --max-length (None when none were)."""
    parts = []
    for part, counted in data.items():
        if part == "sources":  # a data mix's per-source counts, not a fit
            continue
        if counted.get("dropped"):
            parts.append(f"{counted['dropped']} of {counted['examples']} {part} examples dropped (prompt fills it)")
        if counted.get("truncated"):
            parts.append(f"{counted['truncated']} of {counted['examples']} {part} examples cut")
    if not parts:
        return None
    limit = f"--max-length {max_length}" if max_length else "--max-length"
    return f"data at {limit}: " + "; ".join(parts)
