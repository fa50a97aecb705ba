"""lorakit's safetensors reader: the same tensors as safetensors' own, and a malformed header refused."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lorakit.io.safetensors_reader import SafetensorsError, file_identity, open_tensors, read_header

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn]


def value(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def raw_file(path: Path, header: dict, data: bytes) -> Path:
    """A file written by hand: the length, the header as given (padded to 8 bytes, as safetensors
    pads it), the data."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def test_every_dtype_and_shape_reads_as_safetensors_reads_it(tmp_path):
    tensors = {f"t{i}.{str(d).split('.')[-1]}": value(d, shape, i)
               for i, (d, shape) in enumerate([(d, s) for d in DTYPES for s in [(3, 5), (), (0, 4), (7,)]])}
    save_file(tensors, tmp_path / "f.safetensors", metadata={"format": "pt", "note": "ü"})
    mapped = open_tensors(tmp_path / "f.safetensors")
    want = load_file(tmp_path / "f.safetensors")
    assert mapped.metadata == {"format": "pt", "note": "ü"}
    assert mapped.tensors.keys() == want.keys()
    for name, t in mapped.tensors.items():
        assert t.dtype == want[name].dtype and t.shape == want[name].shape, name
        assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                           want[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else want[name]), name


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES[:10]), st.lists(st.integers(0, 6), max_size=3)), min_size=1,
                max_size=6), st.integers(0, 2**16))
def test_random_files_read_back_exactly(tmp_path_factory, specs, seed):
    tensors = {f"x{i}": value(d, tuple(shape), seed + i) for i, (d, shape) in enumerate(specs)}
    path = tmp_path_factory.mktemp("h") / "f.safetensors"
    save_file(tensors, path)
    got = open_tensors(path).tensors
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())


def test_data_that_is_not_aligned_is_copied_and_read_exactly(tmp_path):
    a = torch.arange(6, dtype=torch.float32)
    b = torch.tensor([1.5, -2.0], dtype=torch.float64)
    data = b"\x07" + a.numpy().tobytes() + b.numpy().tobytes()  # one stray byte before the first tensor
    path = raw_file(tmp_path / "odd.safetensors", {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]},
        "b": {"dtype": "F64", "shape": [2], "data_offsets": [25, 41]},
    }, data)
    got = open_tensors(path).tensors
    assert torch.equal(got["a"], a.view(2, 3)) and torch.equal(got["b"], b)


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "I8", "shape": [4], "data_offsets": [16, 20]}}


@pytest.mark.parametrize(("change", "match"), [
    (lambda h: {**h, "a": {**h["a"], "dtype": "F128"}}, "unknown dtype"),
    (lambda h: {**h, "a": {**h["a"], "shape": [2, -2]}}, "not a list of sizes"),
    (lambda h: {**h, "a": {**h["a"], "shape": [2, 2.0]}}, "not a list of sizes"),
    (lambda h: {**h, "a": {**h["a"], "shape": [3, 2]}}, "cannot hold"),
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [16, 0]}}, "not \\[begin, end\\]"),
    (lambda h: {**h, "b": {**h["b"], "data_offsets": [20, 24]}}, "truncated"),
    (lambda h: {**h, "b": {**h["b"], "data_offsets": [12, 16], "dtype": "I32", "shape": [1]}}, "share bytes"),
    (lambda h: {**h, "__metadata__": {"n": 1}}, "strings"),
    (lambda h: {**h, "a": [0, 16]}, "must be an object"),
    (lambda h: [h], "must be a JSON object"),
])
def test_a_malformed_header_is_refused(tmp_path, change, match):
    path = raw_file(tmp_path / "bad.safetensors", change(GOOD), bytes(20))
    for read in (read_header, open_tensors):
        with pytest.raises(SafetensorsError, match=match):
            read(path)


@pytest.mark.parametrize("content", [b"", b"\x01\x02", (10**6).to_bytes(8, "little") + b"{}",
                                     (4).to_bytes(8, "little") + b"{x}]"])
def test_a_file_that_is_not_safetensors_is_refused(tmp_path, content):
    (tmp_path / "x").write_bytes(content)
    with pytest.raises(SafetensorsError):
        open_tensors(tmp_path / "x")


def test_only_metadata_and_empty_tensors_need_no_mapping(tmp_path):
    path = raw_file(tmp_path / "e.safetensors", {"__metadata__": {"k": "v"},
                                                  "z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}, b"")
    mapped = open_tensors(path)
    assert mapped.metadata == {"k": "v"} and mapped.tensors["z"].shape == (0, 3)


def mappings_of(path: Path) -> int:
    with open("/proc/self/maps") as f:
        return sum(str(path) in line for line in f)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_the_mapping_lives_as_long_as_a_view_and_writes_never_reach_the_file(tmp_path):
    path = tmp_path / "f.safetensors"
    save_file({"a": torch.ones(4096), "b": torch.zeros(8)}, path)
    before = path.read_bytes()
    tensors = open_tensors(path).tensors
    a = tensors.pop("a")
    del tensors
    gc.collect()
    assert mappings_of(path) == 1
    a.fill_(7.0)  # the mapping is private: the file keeps its bytes
    assert path.read_bytes() == before
    del a
    gc.collect()
    assert mappings_of(path) == 0


def test_the_identity_changes_when_the_file_is_written_or_replaced(tmp_path):
    path = tmp_path / "f.safetensors"
    save_file({"a": torch.ones(4)}, path)
    first = open_tensors(path).identity
    assert file_identity(path) == first
    time.sleep(0.02)  # past a coarse timestamp's tick
    with open(path, "r+b") as f:  # in place, same size
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    assert file_identity(path) != first
    second = file_identity(path)
    save_file({"a": torch.ones(4)}, tmp_path / "new")
    (tmp_path / "new").replace(path)
    assert file_identity(path) not in (first, second)
    path.unlink()
    assert file_identity(path) is None
