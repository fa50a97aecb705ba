"""The contract every registered method keeps, on a model with every base layer kind.

Parametrized over the registry (lorakit.methods.METHODS) and each method's declared inits, so a
new method is tested by being registered. Each check holds a method to what its capabilities
promise, and to a clear refusal where it declares it cannot:

- always: unchanged at init, the bare base equals the original model, save → load is exact,
  exactly the trainable tensors receive gradients, and a mixed batch (the method beside a LoRA
  neighbour and the base) equals each row alone;
- ``mergeable``: merged equals unmerged, merge twice changes nothing, un-merge restores W, and
  merge_and_unload leaves plain torch modules; otherwise merge and merge_and_unload are refused
  before any layer changes;
- ``peft_type``: PEFT loads the saved folder with equal outputs; otherwise the folder carries
  lorakit's own type, which PEFT's loader refuses.

The checks are plain functions (``CHECKS``), so a test can run them on a method it registers
itself (tests/test_protocol.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

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
MIXED_TARGETS = ["emb", "lin", "c1d"]  # mixed batches stack factors on these kinds (not Conv2d)
PEFT_TARGETS = ["lin", "c1d"]  # the kinds every PEFT adapter type supports
# gradient-svd needs a loss over batches: tests/test_inits.py covers it.
CASES = [(m, init) for m, cls in METHODS.items() for init in cls.inits if init != "gradient-svd"]

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to:UserWarning")


@pytest.fixture(scope="module")
def base() -> nn.Module:
    torch.manual_seed(0)
    return ToyNet().eval()


def make(base: nn.Module, method: str, init: str = "default", targets=TARGETS, **extra) -> lorakit.AdaptedModel:
    config = lorakit.AdapterConfig(method=method, init=init, r=3, alpha=5, target_modules=targets, **extra)
    return lorakit.adapt(copy.deepcopy(base), config)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "adapters" not in k}


def cls_of(method: str):
    return METHODS[method]


def assert_moves(am: lorakit.AdaptedModel, base: nn.Module, inputs) -> torch.Tensor:
    adapted = am(*inputs)
    assert (adapted - base(*inputs)).abs().max() > 1e-3, "the adapter must change the output, or this proves nothing"
    return adapted


# -- the checks ----------------------------------------------------------------------------------
def check_unchanged_at_initialisation(base: nn.Module, method: str, init: str, tmp_path: Path) -> None:
    inputs = toy_inputs()
    am = make(base, method, init)
    assert_close(am(*inputs), base(*inputs), atol=1e-5, rtol=0)


def check_merge(base: nn.Module, method: str, init: str, tmp_path: Path) -> None:
    """Mergeable: merged = unmerged, a second merge is a no-op, unmerge restores W. Otherwise:
    refused with the method's reason before any layer changes."""
    inputs = toy_inputs()
    am = make(base, method, init)
    randomise(am)
    before = weights(am)
    adapted = assert_moves(am, base, inputs)
    if not cls_of(method).mergeable:
        for merge in (am.merge, am.merge_and_unload):
            with pytest.raises(lorakit.ConfigError, match=rf"adapter 'default' \({method}\) cannot be merged: "
                                                           r".*; serve it unmerged"):
                merge()
        assert all(layer.merged == [] for layer in am.adapted_layers().values())
        assert all(torch.equal(v, before[k]) for k, v in weights(am).items())
        assert_close(am(*inputs), adapted, atol=0, rtol=0)
        return
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


def check_base_only_equals_original(base: nn.Module, method: str, init: str, tmp_path: Path) -> None:
    inputs = toy_inputs()
    am = make(base, method, init, modules_to_save=["head"])
    randomise(am)
    with torch.no_grad():
        for p in am.model.head.copies["default"].parameters():
            p.add_(1.0)
    adapted = am(*inputs)
    if cls_of(method).mergeable:
        am.merge()
    with am.base_only():
        assert_close(am(*inputs), base(*inputs), atol=1e-5, rtol=0)
    assert_close(am(*inputs), adapted, atol=1e-5, rtol=0)  # the merged state came back


def check_merge_and_unload_leaves_plain_modules(base: nn.Module, method: str, init: str, tmp_path: Path) -> None:
    if not cls_of(method).mergeable:
        return  # refused: check_merge
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


def check_save_load_exact(base: nn.Module, method: str, init: str, tmp_path: Path) -> None:
    inputs = toy_inputs()
    am = make(base, method, init, modules_to_save=["head"])
    randomise(am)
    adapted = am(*inputs)
    lorakit.save_adapter(am, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == cls_of(method).file_type()
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    assert loaded.configs["default"].method == method
    assert_close(loaded(*inputs), adapted, atol=1e-5, rtol=0)
    assert loaded.trainable_parameters() == []  # loaded for inference unless asked


def check_exactly_trainable_tensors_get_gradients(base: nn.Module, method: str, init: str, tmp_path: Path) -> None:
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


def check_mixed_batch_equals_each_row_alone(base: nn.Module, method: str, init: str, tmp_path: Path) -> None:
    """The method beside a LoRA neighbour and the bare base: stacked when it is mixable, on its
    own rows when it is not; either way each row is what it gives alone."""
    am = make(base, method, init, targets=MIXED_TARGETS)
    am.add_adapter("neighbour", lorakit.AdapterConfig(r=2, target_modules=["lin", "emb"]))
    randomise(am, seed=4)
    names = ["default", "neighbour", "base", "default", "neighbour"]
    ids, image = toy_inputs(batch=len(names), seed=3)
    with torch.no_grad():
        mixed = am(ids, image, adapter_names=names)
        for row, name in enumerate(names):
            one = (ids[row:row + 1], image[row:row + 1])
            if name == "base":
                with am.base_only():
                    alone = am(*one)
            else:
                am.set_active(name)
                alone = am(*one)
            assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-5)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3 and (mixed[1] - mixed[2]).abs().max() > 1e-3


def check_peft_reads_what_it_can(base: nn.Module, method: str, init: str, tmp_path: Path) -> None:
    """PEFT-typed: PEFT loads the folder with equal outputs. Otherwise: lorakit's own peft_type,
    which PEFT's loader refuses (the expected behaviour for a method PEFT lacks)."""
    peft = pytest.importorskip("peft")
    inputs = toy_inputs()
    am = make(base, method, init, targets=PEFT_TARGETS, modules_to_save=["head"])
    randomise(am)
    ours = assert_moves(am.eval(), base, inputs)
    lorakit.save_adapter(am, tmp_path)
    if cls_of(method).peft_type is None:
        with pytest.raises(KeyError, match="LORAKIT_"):
            peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        return
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert_close(theirs(*inputs), ours, atol=1e-5, rtol=0)


CHECKS = [check_unchanged_at_initialisation, check_merge, check_base_only_equals_original,
          check_merge_and_unload_leaves_plain_modules, check_save_load_exact,
          check_exactly_trainable_tensors_get_gradients, check_mixed_batch_equals_each_row_alone,
          check_peft_reads_what_it_can]


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
@pytest.mark.parametrize(("method", "init"), CASES)
def test_contract(base, method, init, check, tmp_path):
    check(base, method, init, tmp_path)
