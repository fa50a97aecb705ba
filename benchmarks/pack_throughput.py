"""Training throughput with and without `lorakit train --pack` on variable-length examples.

Two trainers on the same random Llama-shaped model and the same causal-LM data (answer lengths
drawn so examples hold 16..256 tokens) run the same optimizer steps, interleaved step by step
(the order alternating each round), so load from other processes hits both alike. Tokens are the
real (non-pad) tokens of the step, the figure summary.json's ``tokens_per_second`` counts; the
padding share is the share of the processed positions that were padding.

    PYTHONPATH=src .venv/bin/python benchmarks/pack_throughput.py [--steps 10] [--threads 1] [--bf16 auto]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from lorakit.train.config import TrainConfig
from lorakit.train.loop import Trainer


def write_data(path: Path, n: int, shortest: int, longest: int, seed: int) -> Path:
    """Prompt + completion rows of ``shortest``..``longest`` byte tokens (the EOS token included)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = rng.randint(shortest, longest) - 1
        prompt = rng.randint(1, total // 2)
        text = "".join(rng.choice("abcdefgh ") for _ in range(total))
        rows.append({"prompt": text[:prompt], "completion": text[prompt:]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama,hidden=256,layers=4,heads=4,kv_heads=4,intermediate=688,"
                        "vocab=512", help="a lorakit model spec (byte tokens for random:)")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--shortest", type=int, default=16)
    parser.add_argument("--longest", type=int, default=256, help="also --max-length")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant, after one warm-up step")
    parser.add_argument("--bf16", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "train.jsonl", args.examples, args.shortest, args.longest, seed=0)
        held = write_data(Path(tmp) / "eval.jsonl", 4, args.shortest, args.shortest, seed=1)
        trainers = {}
        for pack in (False, True):
            config = TrainConfig(task="causal-lm", model=args.model, data=str(data), eval_data=str(held),
                                 out=str(Path(tmp) / f"pack-{pack}"), max_length=args.longest,
                                 batch_size=args.batch_size, max_steps=args.steps + 1, targets="all-linear",
                                 bf16=args.bf16, general_samples=0, pack=pack, quiet=True)
            trainers[pack] = Trainer(config)
        times: dict[bool, list[float]] = {False: [], True: []}
        counted: dict[bool, tuple[int, int]] = {}  # (real tokens, positions) of the timed steps, as the loop counts
        for step in range(args.steps + 1):
            if step == 1:  # after the warm-up step
                counted = {pack: (t.state["tokens"], t.state["positions"]) for pack, t in trainers.items()}
            for pack in (False, True) if step % 2 == 0 else (True, False):
                started = time.perf_counter()
                trainers[pack].train_step()
                if step:
                    times[pack].append(time.perf_counter() - started)
        counted = {pack: (t.state["tokens"] - counted[pack][0], t.state["positions"] - counted[pack][1])
                   for pack, t in trainers.items()}
    assert counted[False][0] == counted[True][0]  # the same examples in both
    total = counted[False][0]
    rate = {pack: total / sum(times[pack]) for pack in times}
    ratios = [t_plain / t_pack for t_plain, t_pack in zip(times[False], times[True], strict=True)]
    print(f"## Sequence packing (`--pack`)\n\n`{args.model}`, batch {args.batch_size}, examples of "
          f"{args.shortest}..{args.longest} tokens (--max-length {args.longest}), {args.steps} steps each, "
          f"bf16 {args.bf16}, {args.threads or 'default'} thread(s), {platform.processor() or platform.machine()}, "
          f"load {load:.1f} → {os.getloadavg()[0]:.1f}\n")
    print("| | tokens/s | padding share | median step (s) |\n|---|---|---|---|")
    for pack, name in ((False, "unpacked"), (True, "`--pack`")):
        share = 1 - total / counted[pack][1]
        print(f"| {name} | {rate[pack]:.0f} | {share:.1%} | {statistics.median(times[pack]):.3f} |")
    print(f"\n`--pack` / unpacked tokens/s: {rate[True] / rate[False]:.2f} × (median of per-step ratios "
          f"{statistics.median(ratios):.2f} ×)")


if __name__ == "__main__":
    main()
