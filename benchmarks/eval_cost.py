"""What `lorakit eval` costs against its floor: two plain forward passes per example.

A regression report needs, per example, the base's and the adapter's outputs; the floor is
therefore two forward passes. Everything else the report does (KL, flips, bootstrap intervals,
greedy answers of the listed causal-LM examples, merge parity, writing three files) should add
little. The model has Llama-2-7B's widths (hidden 4096, intermediate 11008, vocab 32000) with
fewer layers, so it fits this machine; the adapter is r=16 on every linear layer with random B.

Timed in one process, interleaved: ``evaluate()`` on a causal-LM task file (the keep set is the
task file, general text off, as the floor has none), and the floor: the same batches through
the base (adapters off) and the adapted model under ``torch.inference_mode``. A second
evaluate() adds the shipped general-text sample, whose cost is two passes per passage.

    .venv/bin/python benchmarks/eval_cost.py [--layers 2 --examples 32 --rounds 3 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import _common as c
import torch

import lorakit
from lorakit.evaluation import EvalOptions, evaluate
from lorakit.train import batches as B
from lorakit.train.models import load_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--general-samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    c.set_threads(args)
    spec = (f"random:llama,hidden={args.hidden},layers={args.layers},heads={args.heads},kv_heads={args.heads},"
            f"intermediate={args.intermediate},vocab={args.vocab}")
    folder = Path(tempfile.mkdtemp(prefix="lorakit_eval_cost_"))
    base = load_model(spec, "causal-lm", seed=0)
    adapted = lorakit.adapt(base, lorakit.AdapterConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    c.randomise_b(adapted, "default", torch.Generator().manual_seed(2))
    lorakit.save_adapter(adapted, folder / "adapter")
    task = _task_file(folder / "task.jsonl", args.examples)
    tokenizer = load_tokenizer(spec)
    encoded = B.encode_lm(_examples(task), tokenizer, 256, str(task))
    adapted.eval()

    def floor() -> None:
        with torch.inference_mode():
            for start in range(0, len(encoded), args.batch):
                batch = B.collate(encoded[start:start + args.batch], tokenizer.pad_token_id)
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                with adapted.base_only():
                    adapted(**inputs)
                adapted(**inputs)

    def report(general: str) -> dict:
        options = EvalOptions(adapters=[str(folder / "adapter")], out=str(folder / "report"), model=spec,
                              data=[str(task)], task="causal-lm", general=general,
                              general_samples=args.general_samples, batch_size=args.batch, quiet=True)
        return evaluate(options)

    times: dict[str, list[float]] = {"floor": [], "eval": [], "eval+general": []}
    details = {}
    for _ in range(args.rounds):
        for name, run in (("floor", floor), ("eval", lambda: report("none")), ("eval+general", lambda: report(""))):
            started = time.perf_counter()
            out = run()
            times[name].append(time.perf_counter() - started)
            if isinstance(out, dict):
                details[name] = out["cost"]
    print(c.header(f"lorakit eval against two forward passes ({args.examples} examples)"))
    rows = [[name, f"{1000 * min(ts) / args.examples:.0f}", f"{c.paired_ratio(times, name, 'floor'):.2f}×"]
            for name, ts in times.items()]
    print()
    print(c.table(["variant", "ms per example (best round)", "× floor (median of paired rounds)"], rows))
    print()
    print(f"model {spec}, adapter r={args.rank} all-linear; general text: the first {args.general_samples} "
          f"passages of the shipped sample; evaluate()'s own count: {json.dumps(details)}")


def _task_file(path: Path, n: int) -> Path:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) + " ->",
             "completion": " " + rng.choice(words)} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _examples(path: Path):
    from lorakit.train.data import lm_examples, read_rows

    return lm_examples(read_rows(path), str(path))


if __name__ == "__main__":
    main()
