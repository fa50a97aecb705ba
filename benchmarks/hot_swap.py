"""Hot swap latency: load, replace, switch and delete an r=16 all-linear adapter of a 7B-shaped model.

Llama-2-7B's shape (hidden 4096, 32 layers, intermediate 11008, vocab 32000) is built on the
meta device, so it costs no memory; lorakit gives adapters of a meta base real CPU tensors.
Two r=16, alpha=32 adapters on every linear layer but the LM head (224 modules) and one of
rank r/2, with random A and B, are saved to a temporary folder (read from the page cache afterwards, as a server reads
a file it was just sent). Timed, ``--repeats`` times each, wall clock:

- load: ``lorakit.load_adapter(model, folder, name=...)``: read both files, check keys, shapes,
  fingerprints and values, build the adapter's modules and copy the tensors in;
- replace: ``model.replace_adapter(name, other_folder)``, the hot swap. Both files have the same
  config (a retrained version), so the new values are copied into the served adapter's tensors
  after every check; "given read_adapter's result" passes the file read and checked beforehand
  (untimed), as ``lorakit serve`` does before taking the lock its batches hold; "other rank" swaps
  in an r/2 adapter, which takes the fresh-load path (load the new one beside the old, delete the
  old, take its name);
- switch: ``model.set_active(other)`` between two loaded adapters;
- delete: ``model.delete_adapter(name)``.

A base on the meta device has no values, so its fingerprint is None and the fingerprint check
compares nothing; on a real base the fingerprints are taken once, when layers are wrapped.
Then a load and an in-place replace are split into their steps (one more run of each, every
step timed).

    .venv/bin/python benchmarks/hot_swap.py [--repeats 20 --rank 16 --threads 1 ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import _common as c
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.io import adapter_files, attaching, reading


def seven_b(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def save_versions(am: lorakit.AdaptedModel, args: argparse.Namespace, root: Path) -> list[Path]:
    """Two versions of an r=rank adapter (same config, other values) and one of rank r/2."""
    folders = []
    for k, rank in enumerate([args.rank, args.rank, max(1, args.rank // 2)]):
        name = f"file{k}"
        torch.manual_seed(args.seed + k)
        am.add_adapter(name, lorakit.AdapterConfig(r=rank, alpha=2.0 * rank, target_modules="all-linear"),
                       activate=False)
        c.randomise_b(am, name, torch.Generator().manual_seed(args.seed + 10 + k))
        folders.append(lorakit.save_adapter(am, root / name, name=name))
        am.delete_adapter(name)
    if args.file_dtype != "float32":  # as PEFT saves an adapter cast to bf16; a load still makes float32 tensors
        dtype = getattr(torch, args.file_dtype)
        for folder in folders:
            weights = folder / adapter_files.WEIGHTS_NAME
            with safe_open(str(weights), framework="pt") as f:
                metadata = f.metadata()
            save_file({k: v.to(dtype) for k, v in load_file(weights).items()}, weights, metadata=metadata)
    return folders


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stats(ts: list[float]) -> list[str]:
    p90 = statistics.quantiles(ts, n=10)[-1] if len(ts) > 1 else ts[0]
    return [f"{c.median_ms(ts):.1f}", f"{1000 * p90:.1f}", f"{1000 * min(ts):.1f}"]


LOAD_STEPS = {"read files (+ NaN/Inf check)": (reading, "read_adapter"),
              "check against the model": (adapter_files, "check_against_model"),
              "build the adapter's modules (add_adapter)": (lorakit.AdaptedModel, "add_adapter"),
              "copy tensors in": (attaching, "_copy_tensors"),
              "freeze (inference only)": (lorakit.AdaptedModel, "freeze_adapter")}
REPLACE_STEPS = {"read files (+ NaN/Inf check)": (reading, "read_adapter"),
                 "check against the model": (attaching, "check_against_model"),
                 "match the served adapter's tensors": (attaching, "_in_place_pairs"),
                 "copy tensors in": (attaching, "_copy_tensors")}


def step_times(run: Callable[[int], object], steps: dict[str, tuple[object, str]], total: str, repeats: int,
               then: Callable[[], object] = lambda: None) -> dict[str, list[float]]:
    """Wall time of each step of ``run(k)``, by wrapping the functions it calls; ``then()``
    (untimed) runs after each."""
    times: dict[str, list[float]] = {k: [] for k in [*steps, total]}
    originals = {label: getattr(owner, attr) for label, (owner, attr) in steps.items()}

    def wrap(label: str, fn: Callable) -> Callable:
        def inner(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[label][-1] += time.perf_counter() - start
        return inner

    for label, (owner, attr) in steps.items():
        setattr(owner, attr, wrap(label, originals[label]))
    try:
        for k in range(repeats):
            for ts in times.values():
                ts.append(0.0)
            times[total][-1] = timed(lambda k=k: run(k))
            then()
    finally:
        for label, (owner, attr) in steps.items():
            setattr(owner, attr, originals[label])
    return times


def try_peft(base: torch.nn.Module, folder: Path) -> str:
    """What PEFT does with the same file on the same meta base."""
    from peft import PeftModel

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            pm = PeftModel.from_pretrained(base, str(folder), adapter_name="one")
            elapsed = time.perf_counter() - start
    except Exception as exc:  # report whatever PEFT raises
        return f"`PeftModel.from_pretrained` on the meta base fails: {type(exc).__name__}: {str(exc)[:200]}"
    devices = {p.device.type for n, p in pm.named_parameters() if "lora_" in n}
    no_ops = sum("is a no-op" in str(w.message) for w in caught)
    return (f"`PeftModel.from_pretrained` on the meta base returns in {1000 * elapsed:.0f} ms, but loads "
            f"nothing: its LoRA tensors are on device(s) {sorted(devices)} and torch warned {no_ops} times that "
            "copying a file tensor into a meta parameter is a no-op")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-2-7B)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--file-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the dtype the adapter files store (the loaded adapters are float32 either way)")
    parser.add_argument("--no-peft", action="store_true")
    args = parser.parse_args()
    c.set_threads(args)
    print(c.header(f"Hot swap: r={args.rank} all-linear adapter of a Llama-2-7B-shaped model (meta device)"))

    am = lorakit.AdaptedModel(seven_b(args))
    with tempfile.TemporaryDirectory() as tmp:
        one, two, narrow = save_versions(am, args, Path(tmp))
        size = (one / adapter_files.WEIGHTS_NAME).stat().st_size
        lorakit.load_adapter(am, one, name="warm-up")
        am.delete_adapter("warm-up")

        load, delete, replace, given_file, restructure, switch = [], [], [], [], [], []
        for _ in range(args.repeats):
            load.append(timed(lambda: lorakit.load_adapter(am, one, name="x")))
            delete.append(timed(lambda: am.delete_adapter("x")))
        lorakit.load_adapter(am, one, name="served")
        lorakit.load_adapter(am, two, name="other", activate=False)
        for k in range(args.repeats):
            replace.append(timed(lambda k=k: am.replace_adapter("served", two if k % 2 == 0 else one)))
            switch.append(timed(lambda k=k: am.set_active("other" if k % 2 == 0 else "served")))
        files = [adapter_files.read_adapter(two), adapter_files.read_adapter(one)]  # read and checked untimed
        for k in range(args.repeats):
            given_file.append(timed(lambda k=k, files=files: am.replace_adapter("served", files[k % 2])))
        del files
        for k in range(args.repeats):
            restructure.append(timed(lambda k=k: am.replace_adapter("other", narrow if k % 2 == 0 else two)))
        modules = len(am.adapter_modules("served"))
        params = sum(p.numel() for m in am.adapter_modules("served").values() for p in m.parameters())
        load_split = step_times(lambda k: lorakit.load_adapter(am, one, name="probe"), LOAD_STEPS,
                                "load_adapter in all", args.repeats, then=lambda: am.delete_adapter("probe"))
        replace_split = step_times(lambda k: am.replace_adapter("served", two if k % 2 == 0 else one),
                                   REPLACE_STEPS, "replace_adapter in all", args.repeats)
        for name in ("served", "other"):
            am.delete_adapter(name)
        peft = None if args.no_peft else try_peft(seven_b(args), one)

    print(f"- model: Llama-2-7B shape on the meta device ({args.layers} layers); adapter: LoRA r={args.rank}, "
          f"{modules} modules, {params:,} parameters, file {size / 2**20:.1f} MiB ({args.file_dtype} safetensors)")
    print(f"- {args.repeats} repeats of each operation, wall clock; load average at end: {c.loadavg()}")
    print()
    print(c.table(["operation", "median ms", "p90 ms", "min ms"], [
        ["load_adapter (file → loaded, frozen)", *stats(load)],
        ["replace_adapter (hot swap, retrained version: in place)", *stats(replace)],
        ["the same, given read_adapter's result (the part a server's batches wait for)", *stats(given_file)],
        [f"replace_adapter (other rank, r={max(1, args.rank // 2)} ↔ {args.rank}: fresh load)", *stats(restructure)],
        ["set_active (switch between two loaded)", *stats(switch)],
        ["delete_adapter", *stats(delete)],
    ]))
    for what, split in (("a load", load_split), ("an in-place replace", replace_split)):
        print()
        print(f"Where {what}'s time goes:")
        print()
        print(c.table(["step", "median ms", "p90 ms", "min ms"], [[k, *stats(v)] for k, v in split.items()]))
    if peft:
        print()
        print(f"PEFT: {peft}.")


if __name__ == "__main__":
    main()
