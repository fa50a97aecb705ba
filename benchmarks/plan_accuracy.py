"""How close `lorakit plan` comes to the memory of real `lorakit train` runs on this CPU.

Each case runs `lorakit train` (the CLI's own entry point) in a fresh child process with glibc told
to hand every freed block above 64 KiB back to the OS at once (MALLOC_MMAP_THRESHOLD_), so
resident memory follows live tensors. The child records its resident memory just before the model
is loaded (python, torch, the tokenizer and the data: the baseline), and around the second
training step (the optimizer state exists from the first): the kernel's peak-RSS mark is reset
(/proc/self/clear_refs ← 5) before the step and read after it. Measured = that peak − baseline:
weights, adapters, optimizer state and the step, which is what the plan's total counts (without its
headroom). Also printed: the file pages mapped since the baseline (RssFile), part of the measured
figure: shared libraries, and the safetensors file transformers maps, which holds the weights
themselves when it loads them without a copy (SmolLM2) and sits beside the copy when it does not
(the MiniLM). Every example fills --max-length (long texts, cut), since the plan assumes full rows.

Usage:
    python benchmarks/plan_accuracy.py [--threads 1] [--cases minilm,smollm2,llama400m,llama400m-gc]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MEASURED_STEP = 1  # 0-based: the second step, the first with AdamW's state already there
LLAMA_400M = "random:llama,hidden=1024,layers=24,heads=16,kv_heads=16,intermediate=2816,vocab=32000"


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    task: str
    flags: list[str] = field(default_factory=list)


CASES = {
    "minilm": Case("MiniLM (default), classify, LoRA r=8 all-linear, 16 × 256", "default", "classify",
                   ["--rank", "8", "--targets", "all-linear", "--batch-size", "16", "--max-length", "256"]),
    "smollm2": Case("SmolLM2-135M, causal-lm, LoRA r=16 all-linear, 4 × 512", "smollm2", "causal-lm",
                    ["--rank", "16", "--targets", "all-linear", "--batch-size", "4", "--max-length", "512"]),
    "llama400m": Case("random Llama 406M, causal-lm, LoRA r=16 all-linear, 2 × 512", LLAMA_400M, "causal-lm",
                      ["--rank", "16", "--targets", "all-linear", "--batch-size", "2", "--max-length", "512"]),
    "llama400m-gc": Case("the same, --gradient-checkpointing", LLAMA_400M, "causal-lm",
                         ["--rank", "16", "--targets", "all-linear", "--batch-size", "2", "--max-length", "512",
                          "--gradient-checkpointing"]),
}


def write_data(folder: Path, task: str) -> Path:
    """Examples longer than any --max-length here: six general-text passages each, cut by lorakit train."""
    from lorakit.general_text import shipped_passages

    passages = shipped_passages()
    texts = [" ".join(passages[i:i + 6]) for i in range(0, 240, 6)]
    if task == "classify":
        path = folder / "long.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows((text, ("negative", "positive")[i % 2]) for i, text in enumerate(texts))
        return path
    path = folder / "long.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def child(argv: list[str]) -> None:
    """Run `lorakit train argv` here, recording RSS at the baseline and around the measured step."""
    import gc

    import lorakit.train.setup as setup
    from lorakit.cli import main
    from lorakit.train.loop import Trainer

    record: dict[str, int] = {}
    load_model, train_step = setup.load_model, Trainer.train_step

    def load_after_baseline(*args, **kwargs):
        gc.collect()
        record["baseline_kib"] = status_kib("VmRSS")
        record["baseline_file_kib"] = status_kib("RssFile")
        return load_model(*args, **kwargs)

    def measured_step(self):
        if self.state["step"] != MEASURED_STEP:
            return train_step(self)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak-RSS mark (VmHWM) starts again from the current RSS
        record["before_step_kib"] = status_kib("VmRSS")
        record["before_step_file_kib"] = status_kib("RssFile")
        loss = train_step(self)
        record["peak_kib"] = status_kib("VmHWM")
        return loss

    setup.load_model, Trainer.train_step = load_after_baseline, measured_step
    code = main(["train", *argv])
    print(json.dumps({"code": code, **record}))


def measure_train(case: Case, data: Path, out: Path, threads: int, steps: int) -> dict:
    argv = ["--model", case.model, "--task", case.task, "--data", str(data), "--eval-data", str(data),
            "--max-steps", str(steps), "--eval-every", "1000", "--save-every", "1000", "--general-samples", "0",
            "--threads", str(threads), "--quiet", "--out", str(out), *case.flags]
    env = dict(os.environ, **MALLOC_ENV, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(argv)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"lorakit train failed for {case.name}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan_for(case: Case):
    from lorakit.cli import build_parser
    from lorakit.plan.command import request_from
    from lorakit.plan.planner import make_plan

    args = build_parser().parse_args(["plan", "--model", case.model, "--task", case.task, "--device", "cpu",
                                      "--bf16", "auto", *case.flags])
    return make_plan(request_from(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    import torch
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.cases.split(","):
            case = CASES[key]
            data = write_data(Path(tmp), case.task)
            real = measure_train(case, data, Path(tmp) / key, args.threads, args.steps)
            plan = plan_for(case)
            gc = "--gradient-checkpointing" in case.flags
            estimate = plan.given(gc).memory(1, False)
            measured = (real["peak_kib"] - real["baseline_kib"]) * 1024
            mapped = (real["before_step_file_kib"] - real["baseline_file_kib"]) * 1024
            rows.append((case.name, estimate, measured, mapped))
            steady = (real["before_step_kib"] - real["baseline_kib"]) * 1024
            step = (real["peak_kib"] - real["before_step_kib"]) * 1024
            print(f"{key}: plan {estimate.total / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB "
                  f"({100 * (estimate.total / measured - 1):+.1f}%); before the step {steady / 2**20:.0f} MiB (plan "
                  f"{(estimate.total - estimate.step_peak) / 2**20:.0f}; {mapped / 2**20:.0f} MiB of it file pages), "
                  f"the step {step / 2**20:.0f} MiB (plan {estimate.step_peak / 2**20:.0f})", flush=True)
    print()
    print("| run | plan: weights + adapters + AdamW | plan: step peak | plan total | measured peak − baseline "
          "| error | file pages in it |")
    print("|---|---|---|---|---|---|---|")
    for name, estimate, measured, mapped in rows:
        static = estimate.base + estimate.adapter + estimate.optimizer
        print(f"| {name} | {static / 2**20:.0f} MiB | {estimate.step_peak / 2**20:.0f} MiB | "
              f"{estimate.total / 2**20:.0f} MiB | {measured / 2**20:.0f} MiB | "
              f"{100 * (estimate.total / measured - 1):+.1f}% | {mapped / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
