"""What each process holds under torchrun: DDP against `lorakit train --shard`, on this CPU.

Two processes train the same run (a random 406M-parameter Llama, LoRA r=16 on every linear, two
steps) three ways: DDP, `--shard`, and `--shard --quantize nf4`. Each worker prints its peak
resident memory (the kernel's high-water mark, `ru_maxrss`) and its resident memory at the end,
after training, less the resident memory of a process that has imported torch and transformers.
glibc is told to hand freed blocks back at once (MALLOC_MMAP_THRESHOLD_), so resident memory
follows live tensors.

The peak shows whether the base is read once: under DDP both processes read all of it, under
--shard only rank 0 does (the other builds it on the meta device). The end figure shows what
sharding keeps: under --shard each process holds half of every weight.

Usage:
    python benchmarks/shard_memory.py [--variants ddp,shard,shard-nf4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = "random:llama,hidden=1024,layers=24,heads=16,kv_heads=16,intermediate=2816,vocab=32000"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
VARIANTS = {"ddp": [], "shard": ["--shard"], "shard-nf4": ["--shard", "--quantize", "nf4"]}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: list[str]) -> None:
    """One torchrun worker: train, then report peak and final resident memory above the imports."""
    import torch  # noqa: F401  (the baseline includes torch and transformers)
    import transformers  # noqa: F401

    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train

    baseline = rss_mib()
    train(TrainConfig(**json.loads(args[0])))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"rank": int(os.environ.get("RANK", 0)), "peak": peak - baseline,
                                  "end": rss_mib() - baseline}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child([args.child])
        return
    torchrun = str(Path(sys.executable).parent / "torchrun")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data.jsonl"
        data.write_text("".join(json.dumps({"text": f"passage {i}: " + "word " * 120}) + "\n" for i in range(32)))
        for name in args.variants.split(","):
            extra = VARIANTS[name]
            config = {"model": MODEL, "task": "causal-lm", "data": str(data), "eval_data": str(data),
                      "targets": "all-linear", "rank": 16, "batch_size": 2, "max_length": 128, "max_steps": 2,
                      "eval_every": 1000, "save_every": 1000, "general_samples": 0, "bf16": "off", "quiet": True,
                      "out": str(Path(folder) / name), "shard": "--shard" in extra,
                      "quantize": "nf4" if "nf4" in extra else "none"}
            done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", __file__,
                                   "--child", json.dumps(config)], env={**os.environ, **MALLOC_ENV},
                                  capture_output=True, text=True, check=True)
            for line in done.stdout.splitlines():
                if line.startswith("RESULT "):
                    rows.append({"variant": name, **json.loads(line[len("RESULT "):])})
    print("| variant | rank | peak MiB above the imports | MiB held at the end |")
    print("|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (list(VARIANTS).index(r["variant"]), r["rank"])):
        print(f"| {row['variant']} | {row['rank']} | {row['peak']:.0f} | {row['end']:.0f} |")


if __name__ == "__main__":
    main()
