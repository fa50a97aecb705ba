"""A method against LoRA at a matched number of trainable parameters, on real data, several seeds.

Why: a new method earns its place by what it does at the same budget, not by its paper's tables.
For each task and seed, in one process and interleaved, `lorakit train` (the code behind the
command) trains LoRA and the method with the same recipe, then the script prints each run's
metric, trainable parameters and seconds per step, and the means over seeds.

Tasks:
- ``drugreview``: the shipped MiniLM on the shipped drug-review sentiment set (test accuracy),
  every linear layer, lr 1e-3 cosine, 100 steps of 16, 128 tokens.
- ``json``: the shipped SmolLM2-135M-Instruct on the LLM demo's json task (a review → its drug and
  sentiment as JSON; eval perplexity on 48 held-out reviews), q/v projections, lr 5e-4, 24 steps of 8.

    .venv/bin/python benchmarks/methods_vs_lora.py --method gpart --method-options d=4096 \\
        [--lora-rank 8] [--rank 8] [--tasks drugreview,json] [--seeds 0,1] [--threads 1]

``--rank`` is the method's rank (for methods that have one); choose it and ``--method-options`` so
that the trainable parameters match LoRA's, which the table shows side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lorakit.train.config import TrainConfig
from lorakit.train.loop import train

RECIPES = {
    "drugreview": dict(model="default", data="default", targets="all-linear", alpha=16.0, lr=1e-3,
                       scheduler="cosine", max_steps=100, eval_every=100, max_length=128),
    "json": dict(model="smollm2", task="causal-lm", max_steps=24, batch_size=8, eval_every=24),
}


def json_data(folder: Path) -> dict[str, str]:
    """The LLM demo's json task, built by its own script."""
    script = Path(__file__).resolve().parent.parent / "examples" / "llm_demo" / "build_data.py"
    subprocess.run([sys.executable, str(script), "--out", str(folder)], check=True, capture_output=True)
    return {"data": str(folder / "json_train.jsonl"), "eval_data": str(folder / "json_eval.jsonl")}


def run(task: str, method: str, rank: int, options: str | None, seed: int, out: Path, extra: dict) -> dict:
    config = TrainConfig(**RECIPES[task], **extra, method=method, rank=rank, method_options=options, seed=seed,
                         out=str(out), general_samples=0, quiet=True, bf16="off")
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(config)
    return {"metric": summary["metric_after"], "name": summary["metric_name"],
            "params": summary["trainable_params"], "s_per_step": summary["seconds"] / max(summary["steps"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--method-options", default=None)
    parser.add_argument("--rank", type=int, default=8, help="the method's rank (if it has one)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--tasks", default="drugreview,json")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for task in args.tasks.split(","):
            extra = json_data(root / "data") if task == "json" else {}
            for seed in seeds:
                for method, rank, options in (("lora", args.lora_rank, None),
                                              (args.method, args.rank, args.method_options)):
                    result = run(task, method, rank, options, seed, root / f"{task}-{method}-{seed}", extra)
                    rows.append({"task": task, "method": method, "seed": seed, **result})
                    print(f"{task:10s} {method:10s} seed {seed}: {result['name']} {result['metric']:.4f}, "
                          f"{result['params']:,} trainable, {result['s_per_step']:.2f} s/step", flush=True)
    print("\nmeans over seeds")
    print(f"{'task':10s} {'method':10s} {'metric':>22s} {'trainable':>10s} {'s/step':>7s}")
    for task in args.tasks.split(","):
        for method in ("lora", args.method):
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            values = [r["metric"] for r in mine]
            spread = f"{statistics.mean(values):.4f} ({min(values):.4f}–{max(values):.4f})"
            print(f"{task:10s} {method:10s} {mine[0]['name'][:4]} {spread:>17s} {mine[0]['params']:>10,d} "
                  f"{statistics.median(r['s_per_step'] for r in mine):7.2f}")


if __name__ == "__main__":
    main()
