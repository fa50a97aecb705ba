"""What the general-text forgetting measurement costs in a default `lorakit train` run.

The default run (`lorakit train --model default --data default`: LoRA on the shipped MiniLM, 3
epochs of the drug reviews, 105 steps, an evaluation per epoch) measures general text once before
training and at each of its 3 evaluations. Two ways to time it:

- components (default): one Trainer times a few training steps, one evaluation and the two kinds
  of measurement in the same process, and extrapolates to the whole run (about a minute);
- ``--full``: a real default run, whose summary.json holds both the run's seconds and the
  measurement's own seconds (minutes on a CPU).

    PYTHONPATH=src .venv/bin/python benchmarks/forgetting_cost.py [--samples 32] [--bf16 auto|off] [--full]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from lorakit.train.config import TrainConfig
from lorakit.train.loop import Trainer, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def components(config: TrainConfig, timed_steps: int) -> None:
    trainer = Trainer(config)
    evaluations = -(-trainer.total_steps // trainer.eval_every)
    started = time.perf_counter()
    trainer.general.start(trainer.state)
    before = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(timed_steps):
        trainer.train_step()
    step = (time.perf_counter() - started) / timed_steps
    started = time.perf_counter()
    trainer.evaluate()
    evaluation = time.perf_counter() - started
    started = time.perf_counter()
    trainer.general.evaluate(trainer.model, trainer.state)
    after = time.perf_counter() - started
    run = trainer.total_steps * step + (evaluations + 1) * evaluation
    general = before + evaluations * after
    print(f"{trainer.total_steps} steps × {step:.3f} s, {evaluations + 1} evaluations × {evaluation:.2f} s; "
          f"general text ({len(trainer.general.passages)} passages): before {before:.2f} s, "
          f"{evaluations} × {after:.2f} s")
    print(f"run ≈ {run:.1f} s without it, measurement ≈ {general:.1f} s: {general / (run + general):.2%} of the run")


def full(config: TrainConfig) -> None:
    started = time.perf_counter()
    summary = train(config)
    wall = time.perf_counter() - started
    general = summary["general"]
    print(f"run {summary['seconds']:.1f} s of training ({wall:.1f} s wall, loading included); general text "
          f"({general['passages']} passages) {general['seconds']:.2f} s: {general['seconds'] / wall:.2%} of the wall "
          f"time; saved adapter's embedding cosine {general.get('embedding_cosine')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=TrainConfig.general_samples)
    parser.add_argument("--bf16", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="training steps timed (components)")
    parser.add_argument("--full", action="store_true", help="time a whole default run instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(out=out, general_samples=args.samples, bf16=args.bf16, threads=args.threads,
                             quiet=True)
        (full if args.full else lambda c: components(c, args.steps))(config)


if __name__ == "__main__":
    main()
