"""The contract every registered method keeps, on a model with every base layer kind.

Unchanged at init, merged equals unmerged, merge twice changes nothing, un-merge restores W,
the bare base equals the original model, save → load is exact, merge_and_unload leaves plain
torch modules, and exactly the trainable tensors receive gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import ToyNet, toy_inputs
from test_methods import randomise
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit.layer import AdaptedLayer
from lorakit.methods import METHODS
from lorakit.saved_modules import SavedModule

TARGETS = ["emb", "lin", "c1d", "conv"]
CASES = [(m, "default") for m in METHODS] + [("lora", "gaussian"), ("lora", "pissa"), ("lora-fa", "pissa")]


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    return ToyNet().eval()


def make(base: nn.Module, method: str, init: str = "default", **extra) -> lorakit.AdaptedModel:
    config = lorakit.AdapterConfig(method=method, init=init, r=3, alpha=5, target_modules=TARGETS, **extra)
    return lorakit.adapt(copy.deepcopy(base), config)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "adapters" not in k}


@pytest.mark.parametrize(("method", "init"), CASES)
def test_unchanged_at_initialisation(base, method, init):
    inputs = toy_inputs()
    am = make(base, method, init)
    assert_close(am(*inputs), base(*inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "init"), CASES)
def test_merge_equals_unmerged_and_unmerge_restores(base, method, init):
    inputs = toy_inputs()
    am = make(base, method, init)
    randomise(am)
    before = weights(am)
    adapted = am(*inputs)
    assert (adapted - base(*inputs)).abs().max() > 1e-3, "the adapter must change the output, or this proves nothing"
    am.merge()
    assert_close(am(*inputs), adapted, atol=1e-5, rtol=0)
    merged_w = weights(am)
    am.merge()  # a second merge is a no-op
    for k, v in weights(am).items():
        assert torch.equal(v, merged_w[k]), k
    am.unmerge()
    for k, v in weights(am).items():
        assert_close(v, before[k], atol=1e-6 * max(before[k].abs().max().item(), 1.0), rtol=1e-6)
    assert_close(am(*inputs), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "init"), CASES)
def test_base_only_equals_original(base, method, init):
    inputs = toy_inputs()
    am = make(base, method, init, modules_to_save=["head"])
    randomise(am)
    with torch.no_grad():
        for p in am.model.head.copies["default"].parameters():
            p.add_(1.0)
    adapted = am(*inputs)
    am.merge()
    with am.base_only():
        assert_close(am(*inputs), base(*inputs), atol=1e-5, rtol=0)
    assert_close(am(*inputs), adapted, atol=1e-5, rtol=0)  # merged state came back


@pytest.mark.parametrize(("method", "init"), CASES)
def test_merge_and_unload_leaves_plain_modules(base, method, init):
    inputs = toy_inputs()
    am = make(base, method, init, modules_to_save=["head"])
    randomise(am)
    with torch.no_grad():
        for p in am.model.head.copies["default"].parameters():
            p.mul_(-2.0)
    adapted = am(*inputs)
    plain = am.merge_and_unload()
    lorakit_classes = [type(m).__name__ for m in plain.modules() if type(m).__module__.startswith("lorakit")]
    assert lorakit_classes == []
    assert not any(isinstance(m, (AdaptedLayer, SavedModule)) for m in plain.modules())
    assert set(plain.state_dict()) == set(base.state_dict())
    assert_close(plain(*inputs), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "init"), CASES)
def test_save_load_exact(base, method, init, tmp_path):
    inputs = toy_inputs()
    am = make(base, method, init, modules_to_save=["head"])
    randomise(am)
    adapted = am(*inputs)
    lorakit.save_adapter(am, tmp_path)
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    assert_close(loaded(*inputs), adapted, atol=1e-5, rtol=0)
    assert loaded.trainable_parameters() == []  # loaded for inference unless asked


@pytest.mark.parametrize(("method", "init"), CASES)
def test_exactly_trainable_tensors_get_gradients(base, method, init):
    inputs = toy_inputs()
    am = make(base, method, init, modules_to_save=["head"])
    randomise(am)
    am(*inputs).square().sum().backward()
    expected = set()
    for path, module in am.adapter_modules("default").items():
        expected |= {f"model.{path}.adapters.default.{name}" for name in module.trainable}
    expected |= {f"model.head.copies.default.{n}" for n, _ in am.model.head.copies["default"].named_parameters()}
    got = {n for n, p in am.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == expected
    requires = {n for n, p in am.named_parameters() if p.requires_grad}
    assert requires == expected
    if method == "lora-fa":
        assert not any(n.endswith("lora_A") for n in requires)
