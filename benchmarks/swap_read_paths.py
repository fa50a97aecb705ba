"""The two passes over the file of an in-place hot swap, by three ways of reading it.

An in-place swap reads the file twice: once to check every value for NaN/Inf before the model
is touched, once to copy the values into the served adapter's tensors. Timed here on the
r=16 all-linear Llama-2-7B-shaped adapter of ``hot_swap.py`` (448 tensors, 153 MiB fp32), into
the same loaded tensors, round-robin:

- safetensors' views: ``safe_open`` + ``get_tensor`` per key, ``first_non_finite``, ``copy_``
  (lorakit before its own reader);
- lorakit's reader: one private mapping, a view per tensor, then the same check and copy;
- ``read()`` calls: each tensor's bytes streamed through one 1 MiB scratch buffer and summed there
  (the check), then ``readinto`` straight into each served tensor, its version bumped with
  ``torch.autograd.graph.increment_version`` (mixed-batch stacks watch versions), and, with
  "re-check", its sum taken again right after its read (a file changed between the passes).

Minor page faults per run are counted too (``getrusage``).

    .venv/bin/python benchmarks/swap_read_paths.py [--rounds 15 --rank 16 --threads 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common as c
import torch
from hot_swap import save_versions, seven_b
from safetensors import safe_open

import lorakit
from lorakit.finite import first_non_finite
from lorakit.io import adapter_files
from lorakit.io.safetensors_reader import open_tensors, read_header

SCRATCH = 1 << 20


Passes = tuple[Callable[[], None], Callable[[], None]]  # the check pass, the copy pass


def mapped(views: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> Passes:
    def check() -> None:
        assert first_non_finite(list(views.values())) is None

    def copy() -> None:
        for key, t in dst.items():
            t.copy_(views[key])

    return check, copy


def safetensors_views(path: Path, dst: dict[str, torch.Tensor]) -> Passes:
    with safe_open(str(path), framework="pt") as f:
        return mapped({k: f.get_tensor(k) for k in dst}, dst)


def lorakit_views(path: Path, dst: dict[str, torch.Tensor]) -> Passes:
    return mapped(open_tensors(path).tensors, dst)


def read_calls(path: Path, dst: dict[str, torch.Tensor], recheck: bool) -> Passes:
    header = read_header(path)
    scratch = torch.empty(SCRATCH // 4)
    buffer = memoryview(scratch.view(torch.uint8).numpy())
    fd = os.open(path, os.O_RDONLY)

    def check() -> None:  # through the scratch buffer
        sums = []
        for entry in header.entries.values():
            for at in range(entry.begin, entry.end, SCRATCH):
                n = min(SCRATCH, entry.end - at)
                assert os.preadv(fd, [buffer[:n]], at) == n
                sums.append(scratch[: n // 4].sum())
        assert bool(torch.isfinite(torch.stack(sums)).all())

    def copy() -> None:  # straight into the served tensors
        sums = []
        try:
            for key, t in dst.items():
                entry = header.entries[key]
                assert os.preadv(fd, [t.view(torch.uint8).view(-1).numpy()], entry.begin) == entry.end - entry.begin
                if recheck:
                    sums.append(t.sum())
            torch.autograd.graph.increment_version(list(dst.values()))
            if recheck:
                assert bool(torch.isfinite(torch.stack(sums)).all())
        finally:
            os.close(fd)

    return check, copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    args.file_dtype = "float32"
    c.set_threads(args)
    print(c.header(f"Reading a hot swap's file: r={args.rank} all-linear adapter of a Llama-2-7B-shaped model"))

    am = lorakit.AdaptedModel(seven_b(args))
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        folder = save_versions(am, args, Path(tmp))[0]
        path = folder / adapter_files.WEIGHTS_NAME
        lorakit.load_adapter(am, folder, name="served")
        file = adapter_files.read_adapter(folder)
        key_at = {t.data_ptr(): k for k, t in file.tensors.items()}  # Linear kinds: a view of the file's tensor
        dst = {key_at[src.data_ptr()]: t for t, src in adapter_files._copy_pairs(am, "served", file)}
        del file
        variants = {
            "safetensors' views (before)": lambda: safetensors_views(path, dst),
            "lorakit's reader (now)": lambda: lorakit_views(path, dst),
            "read(), re-check": lambda: read_calls(path, dst, True),
            "read(), no re-check": lambda: read_calls(path, dst, False),
        }
        times: dict[str, list[tuple[float, float, float, int]]] = {k: [] for k in variants}
        for r in range(args.rounds + 1):
            order = list(variants)[r % len(variants):] + list(variants)[: r % len(variants)]
            for name in order:
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                check, copy = variants[name]()  # opening the file counts with the check
                check()
                checked = time.perf_counter()
                copy()
                end = time.perf_counter()
                if r:  # round 0 warms up
                    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                    times[name].append((end - start, checked - start, end - checked, faults))
        size = path.stat().st_size
    print(f"- file {size / 2**20:.1f} MiB, {len(dst)} tensors; {args.rounds} rounds, order rotating; "
          f"load average at end: {c.loadavg()}")
    print()
    rows = []
    for name, runs in times.items():
        total, check, copy, faults = zip(*runs, strict=True)
        rows.append([name, *(f"{c.median_ms(ts):.1f}" for ts in (total, check, copy)), f"{1000 * min(total):.1f}",
                     f"{statistics.median(faults):.0f}"])
    print(c.table(["way of reading", "median ms", "open + check pass", "copy pass", "min ms", "minor faults"], rows))


if __name__ == "__main__":
    main()
