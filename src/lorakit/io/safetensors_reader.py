"""A safetensors file as tensors on one memory map of it, its header checked first.

safetensors' ``safe_open`` hands out the same views, but each ``get_tensor`` costs about 17 µs
of bookkeeping: 7.8 ms for the 448 tensors of an all-linear 7B adapter, over a tenth of a hot
swap. Here the header is parsed once and each tensor is a slice of one mapping: 2.9 ms for the
same file, header and mapping included. Reading the file with ``read()`` calls instead, which
would spare the mapping's page faults, was measured and is slower: the faults are few (785
for the 39,000 pages of that file: the kernel maps many pages per fault) and the kernel's copy
out of the page cache costs more than torch reading the mapping directly (BENCHMARKS.md §5.2,
``benchmarks/swap_read_paths.py``).

The format: 8 bytes holding N (little-endian u64), N bytes of JSON mapping each tensor's name
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (byte offsets from the end of the
header) and an optional ``"__metadata__"`` of strings, then the tensors' bytes, little-endian
and row-major.

The views alias the file: copy what you keep. The mapping is private and copy-on-write, so a
write to a view never reaches the file; it lives until the last view is gone. A file truncated
while views of it are read kills the reader with SIGBUS, as with safetensors' own views.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER = 100 * 2**20  # safetensors' own limit


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file (truncated, corrupt, or another format)."""


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]  # in the header's order
    metadata: dict[str, str]


def read_header(path: str | Path) -> Header:
    """Parse and check the header: known dtypes, sizes that fit the shapes, data inside the file
    and no two tensors sharing bytes."""
    with open(path, "rb") as f:
        return _read_header(f)


def _read_header(f) -> Header:
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 <= n <= min(MAX_HEADER, size - 8):
        raise SafetensorsError(f"not a safetensors file: {size} bytes, header length {n}")
    return _parse_header(f.read(n), 8 + n, size)


def _parse_header(text: bytes, data_start: int, size: int) -> Header:
    """The header's JSON ``text``; the tensors' bytes start at ``data_start`` of a ``size``-byte file."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SafetensorsError(f"the header is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise SafetensorsError("the header must be a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError("__metadata__ must map strings to strings")
    entries = {name: _entry(name, value, data_start, size) for name, value in raw.items()}
    spans = sorted((e.begin, e.end, name) for name, e in entries.items() if e.end > e.begin)
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise SafetensorsError(f"tensors {first!r} and {second!r} share bytes")
    return Header(entries, metadata)


def _entry(name: str, value: object, data_start: int, size: int) -> Entry:
    if not isinstance(value, dict):
        raise SafetensorsError(f"tensor {name!r}: its header entry must be an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPES:
        raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise SafetensorsError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    torch_dtype = DTYPES[dtype]
    if end - begin != math.prod(shape) * torch_dtype.itemsize:
        raise SafetensorsError(f"tensor {name!r}: {end - begin} bytes cannot hold a {dtype} tensor of shape {shape}")
    if end > size:
        raise SafetensorsError(f"tensor {name!r} ends at byte {end} of a {size}-byte file (truncated?)")
    return Entry(torch_dtype, tuple(shape), begin, end)


@dataclass(frozen=True)
class Mapped:
    tensors: dict[str, torch.Tensor]  # views of the file: copy what you keep
    metadata: dict[str, str]
    identity: tuple[int, ...]  # file_identity() when it was mapped


def open_tensors(path: str | Path) -> Mapped:
    """Every tensor as a view of one private mapping of the file, and the header's metadata."""
    if sys.byteorder != "little":
        raise SafetensorsError("reading safetensors files needs a little-endian machine")
    with open(path, "rb") as f:
        identity = _identity(os.fstat(f.fileno()))
        header = _read_header(f)
        if any(e.end > e.begin for e in header.entries.values()):
            data = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
        else:
            data = torch.empty(0, dtype=torch.uint8)
    return Mapped({name: _view(data, e) for name, e in header.entries.items()}, header.metadata, identity)


def file_identity(path: str | Path) -> tuple[int, ...] | None:
    """(device, inode, size, mtime, ctime) of the file at ``path``, None if it is gone: it differs
    from an earlier one when the file was replaced or written since (on file systems with coarse
    timestamps, not for a write within the same clock tick as the previous one)."""
    try:
        return _identity(os.stat(path))
    except FileNotFoundError:
        return None


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _view(data: torch.Tensor, e: Entry) -> torch.Tensor:
    raw = data[e.begin:e.end]
    if e.begin % e.dtype.itemsize:  # a writer that did not align its data: this tensor is copied
        raw = raw.clone()
    return raw.view(e.dtype).view(e.shape)
