"""Adapter files: bad input is refused before the model changes, writes are atomic."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from model_zoo import tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_methods import randomise
from torch import nn

import lorakit
from lorakit.io import adapter_files


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama(layers=2)


@pytest.fixture
def saved(base, tmp_path):
    am = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomise(am)
    lorakit.save_adapter(am, tmp_path / "adapter")
    return tmp_path / "adapter"


def snapshot(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_untouched(model: nn.Module, before) -> None:
    state, types = before
    assert [type(m) for m in model.modules()] == types, "modules were wrapped or replaced"
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)


def refuse(base, directory, match: str, error=lorakit.AdapterFileError, **kwargs):
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        lorakit.load_adapter(model, directory, **kwargs)
    assert_untouched(model, before)


def test_truncated_weights_are_refused(base, saved):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refuse(base, saved, "corrupt or truncated")


def test_garbage_weights_are_refused(base, saved):
    (saved / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    refuse(base, saved, "corrupt or truncated")


def test_corrupt_config_is_refused(base, saved):
    (saved / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    refuse(base, saved, "not valid JSON")


def test_corrupt_lorakit_metadata_is_refused(base, saved):
    path = saved / "adapter_model.safetensors"
    save_file(load_file(path), path, metadata={"lorakit": '{"fingerprints": '})
    refuse(base, saved, "lorakit metadata is not valid JSON")


def test_missing_key_is_named(base, saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, path)
    refuse(base, saved, r"Missing: base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight")


def test_unexpected_key_is_named(base, saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, path)
    refuse(base, saved, "Unexpected: .*up_proj")


def test_shape_mismatch_is_refused(base, saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["r"] = 8
    (saved / "adapter_config.json").write_text(json.dumps(config))
    refuse(base, saved, r"shape mismatch: .*lora_A\.weight: file \(4, 64\), model needs \(8, 64\)")


def test_nan_weights_are_refused(base, saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, path)
    refuse(base, saved, "NaN")


def test_names_matching_nothing_are_an_error_not_a_silent_base(base, saved):
    """An adapter whose module names match nothing must not load as the bare base."""
    config = json.loads((saved / "adapter_config.json").read_text())
    config["target_modules"] = ["query", "value"]  # a BERT adapter's names on a Llama
    (saved / "adapter_config.json").write_text(json.dumps(config))
    refuse(base, saved, "do not fit this model")


def test_different_base_is_refused_unless_overridden(saved):
    other = tiny_llama(layers=2, seed=1)  # same shapes, other weights
    refuse(other, saved, "different base weights", error=lorakit.FingerprintMismatchError)
    loaded = lorakit.load_adapter(copy.deepcopy(other), saved, check_fingerprint=False)
    assert len(loaded.adapter_modules("default")) == 4


def test_fingerprint_accepts_the_same_base_in_bfloat16(base, saved):
    lorakit.load_adapter(copy.deepcopy(base).to(torch.bfloat16), saved)


def test_fingerprint_of_a_weight_past_float32_positions_samples_inside_it():
    """4096 × 11008 (a Llama-2-7B MLP weight): the last float32 sample position rounds past the end."""
    from lorakit.fingerprint import weight_fingerprint

    weight = torch.arange(4096 * 11008, dtype=torch.int32).view(4096, 11008)
    sample = weight_fingerprint(weight)["sample"]
    assert len(sample) == 32 and sample[0] == 0 and sample[-1] == float(f"{4096 * 11008 - 1:.6g}")
    small = torch.arange(64 * 128, dtype=torch.float32).view(64, 128)  # positions unchanged where they fit
    expected = torch.linspace(0, 64 * 128 - 1, 32).round().tolist()
    assert weight_fingerprint(small)["sample"] == [float(f"{v:.6g}") for v in expected]


def test_vocabulary_change_says_what_to_resize(base, saved):
    bigger = copy.deepcopy(base)
    bigger.resize_token_embeddings(130)
    refuse(bigger, saved, r"resize_token_embeddings\(128\)", error=lorakit.FingerprintMismatchError)


def test_unknown_config_keys(base, saved, caplog):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["some_future_option"] = None  # at its default: ignored with a note
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with caplog.at_level("INFO", logger="lorakit"):
        lorakit.load_adapter(copy.deepcopy(base), saved)
    assert "some_future_option" in caplog.text
    config["some_future_option"] = 3  # a value that would change the result: refused
    (saved / "adapter_config.json").write_text(json.dumps(config))
    refuse(base, saved, "some_future_option=3")


def test_load_reports_what_was_applied(base, saved, caplog):
    with caplog.at_level("INFO", logger="lorakit"):
        lorakit.load_adapter(copy.deepcopy(base), saved)
    assert "8 tensors onto 4 modules" in caplog.text


def test_failed_write_leaves_previous_file_intact(base, saved, monkeypatch):
    original = (saved / "adapter_model.safetensors").read_bytes()
    am = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_files, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(am, saved)
    assert (saved / "adapter_model.safetensors").read_bytes() == original
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_loading_twice_under_one_name_is_refused(base, saved):
    am = lorakit.load_adapter(copy.deepcopy(base), saved, name="x")
    with pytest.raises(lorakit.AdapterFileError, match="already loaded"):
        lorakit.load_adapter(am, saved, name="x")
    lorakit.load_adapter(am, saved, name="y")
    assert [i.name for i in am.list_adapters()] == ["x", "y"]


def test_saved_files_get_the_usual_permissions(saved):
    """Atomic writes go through a private temp file; the result must still be readable by others."""
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert os.stat(saved / name).st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_check_is_exact(bad):
    """The one-read check must catch a single NaN/Inf anywhere, and large finite values too."""
    from lorakit.finite import all_finite

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        t = torch.zeros(257, 33, dtype=dtype)
        assert all_finite(t)
        t[200, 7] = bad
        assert not all_finite(t), (dtype, bad)
    huge = torch.full((1000,), torch.finfo(torch.float32).max)  # the sum overflows, the values do not
    assert all_finite(huge)
    both = torch.tensor([float("inf"), float("-inf")])  # sums to NaN
    assert not all_finite(both)


def test_loaded_adapter_survives_its_file_being_rewritten_in_place(base, saved):
    """A server keeps adapters loaded while users rewrite their folders: parameters must not stay
    on a memory map of the file (truncating a mapped file kills the reader with SIGBUS)."""
    am = lorakit.load_adapter(copy.deepcopy(base), saved)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        before = am(input_ids=ids).logits
    weights = saved / "adapter_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "wb") as f:  # in place, as safetensors' save_file does: truncate, then write
        f.write(b"\0" * size)
    with torch.no_grad():
        assert torch.equal(am(input_ids=ids).logits, before)


@pytest.mark.parametrize("config", [
    lorakit.AdapterConfig(method="vera", r=4, target_modules=["q_proj", "v_proj"]),
    lorakit.AdapterConfig(method="dora", r=4, target_modules=["q_proj", "v_proj"]),
    lorakit.AdapterConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
], ids=["vera", "dora", "saved-head"])
def test_no_loaded_tensor_stays_on_the_file(base, tmp_path, config):
    """Every tensor a load fills (VeRA's shared projections, DoRA's magnitudes, trainable copies)
    is a copy: rewriting the file in place changes nothing loaded."""
    am = lorakit.adapt(copy.deepcopy(base), config)
    randomise(am)
    lorakit.save_adapter(am, tmp_path / "adapter")
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    before = {n: t.detach().clone() for n, t in [*loaded.named_parameters(), *loaded.named_buffers()]}
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "wb") as f:
        f.write(b"\0" * size)
    after = dict([*loaded.named_parameters(), *loaded.named_buffers()])
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_first_non_finite_names_the_first_bad_tensor():
    from lorakit.finite import first_non_finite

    tensors = [torch.zeros(3), torch.arange(4), torch.zeros(0), torch.full((5,), torch.finfo(torch.float32).max),
               torch.zeros(2, dtype=torch.float64), torch.ones(3, dtype=torch.bfloat16)]
    assert first_non_finite(tensors) is None  # the overflowing sum of index 3 is decided exactly
    assert first_non_finite([]) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        later = [t.clone() for t in tensors]
        later[4][1] = bad
        later[5][0] = bad
        assert first_non_finite(later) == 4


def test_vera_and_lora_fa_files_written_before_method_options_load_the_same(base, tmp_path):
    """Files of earlier versions spell VeRA's seed as ``vera_seed`` in lorakit's metadata (and have
    no ``options``); they load with the same options, and LoRA-FA still comes back as LoRA-FA."""
    for config in (lorakit.AdapterConfig(method="vera", r=4, target_modules=["q_proj"], options={"projection_seed": 5}),
                   lorakit.AdapterConfig(method="lora-fa", r=4, target_modules=["q_proj"])):
        am = lorakit.adapt(copy.deepcopy(base), config)
        randomise(am)
        folder = tmp_path / config.method
        lorakit.save_adapter(am, folder)
        weights = folder / "adapter_model.safetensors"
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata()
        lorakit_meta = json.loads(metadata["lorakit"])
        old = {k: v for k, v in lorakit_meta["config"].items() if k != "options"}
        if config.method == "vera":
            old.update(vera_seed=5, vera_d_initial=0.1)
        metadata["lorakit"] = json.dumps({**lorakit_meta, "config": old})
        save_file(load_file(weights), weights, metadata=metadata)
        loaded = lorakit.load_adapter(copy.deepcopy(base), folder)
        assert loaded.configs["default"].method == config.method
        assert loaded.configs["default"].options == config.options
        ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, am(input_ids=ids).logits)
