"""Many adapters on one model: add, activate, deactivate, delete, list, and precision of merges."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from model_zoo import tiny_llama
from test_methods import randomise
from torch import nn
from torch.testing import assert_close

import lorakit


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama(layers=2)


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def storage_bytes(model: nn.Module) -> int:
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values())


def two_adapters(base) -> lorakit.AdaptedModel:
    am = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    am.add_adapter("b", lorakit.AdapterConfig(method="dora", r=2, target_modules="all-linear"))
    randomise(am)
    return am


def test_switching_adapters_switches_outputs(base):
    am = two_adapters(base)
    assert am.active == ("a",)  # the first adapter is active; later ones wait to be asked
    out_a = logits(am)
    am.set_active("b")
    out_b = logits(am)
    am.set_active("a", "b")
    both = logits(am)
    am.set_active()
    assert_close(logits(am), logits(base), atol=1e-5, rtol=0)
    assert not torch.allclose(out_a, out_b)
    # q/v updates of "a" and the DoRA "b" combine; the sum differs from each alone.
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)
    am.set_active("a")
    assert_close(logits(am), out_a)


def test_only_active_adapters_train(base):
    am = two_adapters(base)
    am.set_active("b")
    names = {n for n, p in am.named_parameters() if p.requires_grad}
    assert names and all(".adapters.b." in n for n in names)


def test_listing_with_parameter_counts(base):
    am = two_adapters(base)
    info = {i.name: i for i in am.list_adapters()}
    assert set(info) == {"a", "b"}
    assert info["a"].modules == 4 and info["a"].rank == 4 and info["a"].active
    # q_proj: 64→64, v_proj: 64→32 (2 kv heads of 16); r=4 → 4*(64+64) + 4*(64+32) per layer
    assert info["a"].trainable_params == info["a"].params == 2 * (4 * 128 + 4 * 96)
    assert info["b"].method == "dora" and not info["b"].active
    # An inactive adapter still reports what training it would update; LoRA-FA's frozen A is not in it.
    am.add_adapter("fa", lorakit.AdapterConfig(method="lora-fa", r=4, target_modules=["q_proj"]))
    fa = {i.name: i for i in am.list_adapters()}["fa"]
    assert not fa.active
    assert fa.trainable_params == 2 * 4 * 64  # B (64×4) per layer
    assert fa.params == 2 * (4 * 64 + 64 * 4)


def test_unknown_names_are_errors(base):
    am = two_adapters(base)
    with pytest.raises(lorakit.AdapterNotFoundError, match=r"'c'.*loaded: a, b"):
        am.set_active("c")
    with pytest.raises(lorakit.AdapterNotFoundError):
        am.delete_adapter("c")
    with pytest.raises(lorakit.ConfigError, match="already loaded"):
        am.add_adapter("a", lorakit.AdapterConfig())


def test_delete_returns_memory_and_restores_the_base(base):
    am = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(r=4, target_modules="all-linear"), "a")
    before = storage_bytes(am)
    am.add_adapter("big", lorakit.AdapterConfig(r=32, target_modules="all-linear"))
    am.add_adapter("v", lorakit.AdapterConfig(method="vera", r=16, target_modules="all-linear"))
    assert storage_bytes(am) > before
    probe = weakref.ref(am.adapter_modules("big")["model.layers.0.mlp.up_proj"].lora_A)
    am.delete_adapter("big")
    am.delete_adapter("v")
    gc.collect()
    assert probe() is None, "a deleted adapter's tensors must be freed"
    assert storage_bytes(am) == before
    assert [i.name for i in am.list_adapters()] == ["a"]


def test_delete_merged_adapter_unmerges_first(base):
    am = two_adapters(base)
    am.set_active("a", "b")
    am.merge()
    am.delete_adapter("b")
    am.set_active("a")
    expected = logits(am)
    am.unmerge()
    assert_close(logits(am), expected, atol=1e-5, rtol=0)
    am.delete_adapter("a")
    assert_close(logits(am), logits(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_merging_stacked_lora_and_dora_equals_running_them_unmerged(base, order):
    """DoRA's row norm in the unmerged forward is that of the base weight plus its own update;
    merging must not fold the LoRA merged before it into that norm."""
    am = two_adapters(base)
    am.set_active(*order)
    expected = logits(am)
    assert (expected - logits(base)).abs().max() > 1e-2
    am.merge()
    assert_close(logits(am), expected, atol=3e-5, rtol=1e-5)
    am.unmerge()
    assert_close(logits(am), expected, atol=3e-5, rtol=1e-5)
    merged_copy = am.merge_and_unload()
    with torch.no_grad():
        assert_close(merged_copy(input_ids=ids()).logits, expected, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_half_precision_merge_rounds_once_and_unmerges_exactly(dtype, method):
    torch.manual_seed(0)
    layer = nn.Linear(32, 16).to(dtype)
    am = lorakit.adapt(nn.Sequential(layer), lorakit.AdapterConfig(method=method, r=4, target_modules=["0"]))
    randomise(am)
    W0 = layer.weight.detach().clone()
    m = am.adapter_modules("default")["0"]
    expected = m.merged_weight(W0.float()).to(dtype)  # float32 maths, one rounding
    am.merge()
    assert torch.equal(am.model[0].base_layer.weight, expected)
    am.unmerge()
    assert torch.equal(am.model[0].base_layer.weight, W0)


def test_fp32_unmerge_after_many_cycles_stays_within_1e6():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    am = lorakit.adapt(nn.Sequential(layer), lorakit.AdapterConfig(method="dora", r=8, target_modules=["0"]))
    randomise(am)
    W0 = layer.weight.detach().clone()
    for _ in range(20):
        am.merge()
        am.unmerge()
    rel = (layer.weight - W0).norm() / W0.norm()
    assert rel < 1e-6


def test_adapters_added_to_an_eval_model_are_in_eval_mode():
    """Dropout in a freshly loaded adapter must not fire when the model is in eval mode."""
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    am = lorakit.adapt(model, lorakit.AdapterConfig(r=2, dropout=0.5, target_modules=["0"]))
    randomise(am)
    assert not any(m.training for m in am.modules())
    x = torch.randn(16, 8)
    assert_close(am(x), am(x))
    am.add_adapter("second", lorakit.AdapterConfig(r=2, dropout=0.5, target_modules=["0"]))
    assert not any(m.training for m in am.modules())
