"""Hot swap: replace_adapter checks the whole file first, copies a retrained adapter into the
served one's tensors, and leaves the served state (values, active order, frozen) as it was on
any error."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
from model_zoo import tiny_llama
from safetensors.torch import load_file, save_file
from test_methods import randomise
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit.io import adapter_files, attaching

CONFIGS = {
    "lora": lorakit.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "dora": lorakit.AdapterConfig(method="dora", r=3, target_modules="all-linear"),
    "vera": lorakit.AdapterConfig(method="vera", r=8, target_modules=["q_proj", "o_proj"]),
    "lora-fa+head": lorakit.AdapterConfig(method="lora-fa", r=2, target_modules=["k_proj"],
                                          modules_to_save=["lm_head"]),
}
IDS = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama(layers=1)


def trained(base: nn.Module, config: lorakit.AdapterConfig, seed: int) -> lorakit.AdaptedModel:
    """``base`` with one adapter of random values (its trainable head copy too)."""
    am = lorakit.adapt(copy.deepcopy(base), config)
    randomise(am, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for saved in am.saved_modules().values():
            for p in saved.copies["default"].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, p in am.named_parameters():  # updates of a realistic size, as in test_mixed_batches
            if name.endswith(("lora_B", "vera_lambda_b")):
                p.mul_(0.1)
    return am.eval()


def versions(base: nn.Module, config: lorakit.AdapterConfig, folder: Path) -> tuple[list[Path], list[torch.Tensor]]:
    """Two versions of one adapter (same config, other values) saved under ``folder``, and the
    logits each gives on IDS."""
    paths, logits = [], []
    for seed in (1, 2):
        am = trained(base, config, seed)
        paths.append(lorakit.save_adapter(am, folder / f"v{seed}"))
        with torch.no_grad():
            logits.append(am(input_ids=IDS).logits)
    return paths, logits


def served_two(base: nn.Module, path: Path) -> lorakit.AdaptedModel:
    """A served model with "team" and "side" both loaded from ``path``, both active, in that order."""
    served = lorakit.load_adapter(copy.deepcopy(base), path, name="team")
    lorakit.load_adapter(served, path, name="side")
    served.set_active("team", "side")
    return served.eval()


def state(am: lorakit.AdaptedModel) -> tuple:
    """Everything a failed swap must leave as it was."""
    values = {n: p.detach().clone() for n, p in am.named_parameters()}
    buffers = {n: b.clone() for n, b in am.named_buffers()}
    flags = {n: p.requires_grad for n, p in am.named_parameters()}
    return values, buffers, flags, am.active, set(am.frozen), [i.name for i in am.list_adapters()]


def assert_same_state(am: lorakit.AdaptedModel, before: tuple) -> None:
    values, buffers, flags, active, frozen, names = state(am)
    assert (active, frozen, names) == before[3:]
    assert flags == before[2]
    for now, then in ((values, before[0]), (buffers, before[1])):
        assert now.keys() == then.keys() and all(torch.equal(now[k], then[k]) for k in now)


def rows(am: lorakit.AdaptedModel, names: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return am(input_ids=IDS, adapter_names=names).logits


@pytest.mark.parametrize("kind", CONFIGS)
def test_a_retrained_adapter_is_copied_in_place(base, kind, tmp_path):
    (one, two), (want_one, want_two) = versions(base, CONFIGS[kind], tmp_path)
    served = served_two(base, one)
    rows(served, ["team", "side", "base"])  # mixed-batch stacks now hold copies of the old values
    tensors = [id(p) for p in served._adapter_parameters("team")]
    pointers = [p.data_ptr() for p in served._adapter_parameters("team")]

    served.replace_adapter("team", two)

    assert [id(p) for p in served._adapter_parameters("team")] == tensors, "modules were rebuilt"
    assert [p.data_ptr() for p in served._adapter_parameters("team")] == pointers, "memory was reallocated"
    assert served.active == ("team", "side") and served.frozen == {"team", "side"}
    assert not any(p.requires_grad for p in served.parameters())
    mixed = rows(served, ["team", "side", "base"])  # the stacks follow the new values
    assert_close(mixed[0], want_two[0], atol=1e-5, rtol=1e-5)
    assert_close(mixed[1], want_one[1], atol=1e-5, rtol=1e-5)
    served.set_active("team")
    with torch.no_grad():
        assert_close(served(input_ids=IDS).logits, want_two, atol=1e-5, rtol=1e-5)
    fresh = lorakit.load_adapter(copy.deepcopy(base), two)  # in place ends where a fresh load does
    dtypes = [p.dtype for p in fresh._adapter_parameters("default")]
    assert [p.dtype for p in served._adapter_parameters("team")] == dtypes


def nan_file(path: Path, folder: Path) -> Path:
    """``path`` copied with one NaN in its last tensor: the same structure, so it would go in place."""
    folder.mkdir()
    (folder / adapter_files.CONFIG_NAME).write_bytes((path / adapter_files.CONFIG_NAME).read_bytes())
    from safetensors import safe_open

    with safe_open(str(path / adapter_files.WEIGHTS_NAME), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path / adapter_files.WEIGHTS_NAME)
    last = sorted(tensors)[-1]
    tensors[last] = tensors[last].clone()
    tensors[last].view(-1)[-1] = float("nan")
    save_file(tensors, folder / adapter_files.WEIGHTS_NAME, metadata=metadata)
    return folder


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_a_bad_file_leaves_the_served_adapter_as_it_was(base, kind, tmp_path):
    (one, _), (want_one, _) = versions(base, CONFIGS[kind], tmp_path)
    foreign = lorakit.save_adapter(trained(tiny_llama(layers=1, seed=5), CONFIGS[kind], 3), tmp_path / "foreign")
    corrupt = lorakit.save_adapter(trained(base, CONFIGS[kind], 4), tmp_path / "corrupt")
    weights = corrupt / adapter_files.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    served = served_two(base, one)
    rows(served, ["team", "side", "base"])
    before = state(served)
    for folder, error in [(nan_file(one, tmp_path / "nan"), lorakit.AdapterFileError),
                          (foreign, lorakit.FingerprintMismatchError),
                          (corrupt, lorakit.AdapterFileError),
                          (tmp_path / "missing", lorakit.AdapterFileError)]:
        with pytest.raises(error):
            served.replace_adapter("team", folder)
        assert_same_state(served, before)
    assert_close(rows(served, ["team", "base", "team"])[0], want_one[0], atol=1e-5, rtol=1e-5)


def test_a_swap_that_changes_the_structure_loads_fresh_and_keeps_the_active_order(base, tmp_path):
    (one, _), _ = versions(base, CONFIGS["lora"], tmp_path)
    (wide, _), (want_wide, _) = versions(base, CONFIGS["dora"], tmp_path / "dora")
    served = served_two(base, one)
    tensors = {id(p) for p in served._adapter_parameters("team")}
    served.replace_adapter("team", wide)
    assert not tensors & {id(p) for p in served._adapter_parameters("team")}
    assert served.active == ("team", "side") and served.frozen == {"team", "side"}
    assert served.configs["team"].method == "dora"
    assert [i.name for i in served.list_adapters()] == ["side", "team"]
    assert_close(rows(served, ["team", "base", "team"])[0], want_wide[0], atol=1e-5, rtol=1e-5)


def test_a_merged_adapter_is_swapped_by_a_fresh_load(base, tmp_path):
    """Copying in place would leave the old update in the merged base weight."""
    (one, two), (_, want_two) = versions(base, CONFIGS["lora"], tmp_path)
    served = lorakit.load_adapter(copy.deepcopy(base), one, name="team").eval()
    served.merge()
    served.replace_adapter("team", two)
    assert not any(layer.merged for layer in served.adapted_layers().values())
    with torch.no_grad():
        assert_close(served(input_ids=IDS).logits, want_two, atol=1e-5, rtol=1e-5)


def test_replace_keeps_a_trainable_adapter_trainable_only_when_asked(base, tmp_path):
    (one, two), _ = versions(base, CONFIGS["lora-fa+head"], tmp_path)
    am = lorakit.load_adapter(copy.deepcopy(base), one, name="team", trainable=True)
    grads = {n: p.requires_grad for n, p in am.named_parameters()}
    assert any(grads.values()) and not all(grads.values())  # LoRA-FA's A and the base stay frozen
    am.replace_adapter("team", two, trainable=True)
    assert {n: p.requires_grad for n, p in am.named_parameters()} == grads and not am.frozen
    am.replace_adapter("team", one)  # loads are for inference unless asked: frozen from now on
    assert am.frozen == {"team"} and not any(p.requires_grad for p in am.parameters())
    am.replace_adapter("team", two, trainable=True)  # a frozen adapter stays frozen
    assert am.frozen == {"team"} and not any(p.requires_grad for p in am.parameters())


def test_an_interrupted_in_place_copy_removes_the_adapter(base, tmp_path, monkeypatch):
    """Every check passes before the first copy, so only an interruption can stop one midway; the
    half-written adapter must not be served."""
    (one, two), (want_one, _) = versions(base, CONFIGS["lora"], tmp_path)
    served = served_two(base, one)
    real = attaching._copy_tensors

    def interrupted(pairs):
        real(pairs[: len(pairs) // 2])
        raise RuntimeError("interrupted")

    monkeypatch.setattr(attaching, "_copy_tensors", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        served.replace_adapter("team", two)
    assert [i.name for i in served.list_adapters()] == ["side"] and served.active == ("side",)
    assert_close(rows(served, ["side", "base", "side"])[0], want_one[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["replace in place", "load"])
def test_a_file_written_during_the_copy_is_not_served(base, tmp_path, monkeypatch, how):
    """Tensors are read through the file's memory map until the copy ends, so a write to the file
    midway (PEFT's save_pretrained rewrites in place) would mix versions or bring unchecked NaN:
    the half-written adapter is removed and the error says why."""
    (one, two), (want_one, _) = versions(base, CONFIGS["lora"], tmp_path)
    weights = two / adapter_files.WEIGHTS_NAME
    nan = (nan_file(two, tmp_path / "nan") / adapter_files.WEIGHTS_NAME).read_bytes()
    assert len(nan) == weights.stat().st_size  # the same layout: the views now show the NaN file
    served = served_two(base, one)
    real = attaching._copy_tensors

    def rewritten_midway(pairs):
        real(pairs[: len(pairs) // 2])
        time.sleep(0.02)  # past a coarse timestamp's tick
        weights.write_bytes(nan)
        real(pairs[len(pairs) // 2:])

    monkeypatch.setattr(attaching, "_copy_tensors", rewritten_midway)
    with pytest.raises(lorakit.AdapterFileError, match="written while it was being loaded"):
        if how == "load":
            lorakit.load_adapter(served, two, name="new")
        else:
            served.replace_adapter("team", two)
    remaining = ["side"] if how != "load" else ["side", "team"]
    assert sorted(i.name for i in served.list_adapters()) == remaining
    assert_close(rows(served, ["side", "base", "side"])[0], want_one[0], atol=1e-5, rtol=1e-5)


def as_bf16(path: Path, folder: Path) -> Path:
    """``path`` with every tensor stored in bf16 (as PEFT saves an adapter cast to bf16)."""
    folder.mkdir()
    (folder / adapter_files.CONFIG_NAME).write_bytes((path / adapter_files.CONFIG_NAME).read_bytes())
    from safetensors import safe_open

    with safe_open(str(path / adapter_files.WEIGHTS_NAME), framework="pt") as f:
        metadata = f.metadata()
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(path / adapter_files.WEIGHTS_NAME).items()}
    save_file(tensors, folder / adapter_files.WEIGHTS_NAME, metadata=metadata)
    return folder


@pytest.mark.parametrize("kind", CONFIGS)
def test_a_bf16_file_goes_in_place_and_ends_where_a_fresh_load_does(base, kind, tmp_path):
    (one, two), _ = versions(base, CONFIGS[kind], tmp_path)
    half = as_bf16(two, tmp_path / "bf16")
    served = served_two(base, one)
    rows(served, ["team", "side", "base"])
    tensors = [id(p) for p in served._adapter_parameters("team")]

    served.replace_adapter("team", half)

    assert [id(p) for p in served._adapter_parameters("team")] == tensors, "modules were rebuilt"
    fresh = lorakit.load_adapter(copy.deepcopy(base), half, name="team").eval()
    got, want = dict(served.named_parameters()), dict(fresh.named_parameters())
    for n, p in want.items():
        assert got[n].dtype == p.dtype and torch.equal(got[n], p), n
    assert_close(rows(served, ["team", "base", "team"])[0], rows(fresh, ["team", "base", "team"])[0])


def test_a_file_read_beforehand_is_read_again_when_written_since(base, tmp_path):
    """A server reads and checks the file before taking its lock; if the file is written while it
    waits, the swap reads it again, so NaN written meanwhile is still refused before any change."""
    (one, two), (_, want_two) = versions(base, CONFIGS["lora"], tmp_path)
    served = served_two(base, one)
    early = lorakit.read_adapter(two)
    served.replace_adapter("team", early)  # unchanged: used as read
    assert_close(rows(served, ["team", "base", "team"])[0], want_two[0], atol=1e-5, rtol=1e-5)
    early = lorakit.read_adapter(one)
    time.sleep(0.02)  # past a coarse timestamp's tick
    weights = one / adapter_files.WEIGHTS_NAME
    weights.write_bytes((nan_file(one, tmp_path / "nan") / adapter_files.WEIGHTS_NAME).read_bytes())
    before = state(served)
    with pytest.raises(lorakit.AdapterFileError, match="NaN"):
        served.replace_adapter("team", early)
    assert_same_state(served, before)
