"""A method is one file: a non-mergeable adapter defined here, registered at test time, works everywhere.

``SiluGate`` (y = W x + s · U silu(g · D x), with its own option g and its own tensor names) is
written the way a contributor would write a new method, and nothing outside this file knows it.
Registered, it trains, saves and loads back exactly under lorakit's own peft_type, is refused
with a clear error wherever its update would have to be a weight change (merge, merge_and_unload,
``lorakit merge``, combine) before anything changes, and serves in mixed batches beside LoRA
(its rows through its own forward, LoRA's rows stacked as before). It also passes every check of
the contract the registered methods keep (tests/test_contract.py).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from model_zoo import ToyNet, tiny_llama
from test_contract import CHECKS
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit.combine import combine_adapters
from lorakit.kinds_base import LayerKind
from lorakit.methods import METHODS, AdapterMethod, LoRA, register_method, unregister_method

NAME = "silu-gate"


@dataclass(frozen=True)
class GateOptions:
    gate: float = 1.0  # g in silu(g · D x)

    def __post_init__(self) -> None:
        if not isinstance(self.gate, (int, float)) or self.gate <= 0:
            raise ValueError(f"gate must be a positive number, got {self.gate!r}")


class SiluGate(AdapterMethod):
    """y = W x + s · U silu(g · D x): a parallel non-linear adapter, D (r, in), U (out, r), U = 0 at init."""

    method_name = NAME
    title = "SiLU gate"
    mergeable = False
    mixable = False
    combinable = False
    why_not_mergeable = "its update is non-linear"
    trainable = ("gate_down", "gate_up")
    up_tensors = ("gate_up",)
    Options = GateOptions

    def __init__(self, kind: LayerKind, rank: int, scaling: float, dropout: float, gate: float) -> None:
        super().__init__(kind, rank, scaling, dropout)
        self.gate = gate
        self.gate_down = nn.Parameter(torch.randn(rank, kind.in_features) / math.sqrt(kind.in_features))
        self.gate_up = nn.Parameter(torch.zeros(kind.out_features, rank))

    @classmethod
    def create(cls, kind, config, path, shared):
        return cls(kind, config.rank_for(path), cls.scaling_for(config, path), config.dropout, config.options.gate)

    def forward(self, x, base_out, base_layer, *, inplace=False):
        h = F.silu(self.gate * self.kind.down(self.dropout(x), self.gate_down))
        return base_out + self.scaling * self.kind.up(h, self.gate_up).to(base_out.dtype)


@pytest.fixture
def registered():
    register_method(SiluGate)
    yield SiluGate
    unregister_method(NAME)


def config(**changes) -> lorakit.AdapterConfig:
    fields = {"method": NAME, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "options": {"gate": 0.5}}
    return lorakit.AdapterConfig(**{**fields, **changes})


def nudge(am: lorakit.AdaptedModel, name: str, seed: int = 0) -> None:
    """Move the adapter's up side off zero, so its update shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for method in am.adapter_modules(name).values():
            up = method.gate_up if isinstance(method, SiluGate) else method.lora_B
            up.copy_(torch.randn(up.shape, generator=g) * 0.2)


def ids(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, 6), generator=torch.Generator().manual_seed(seed))


def served() -> lorakit.AdaptedModel:
    """A Llama with a LoRA ("lora") and the gate ("gate") on overlapping layers, both active."""
    am = lorakit.adapt(tiny_llama(layers=2), lorakit.AdapterConfig(r=4, target_modules=["q_proj", "o_proj"]), "lora")
    am.add_adapter("gate", config(), activate=True)
    nudge(am, "lora", seed=1)
    nudge(am, "gate", seed=2)
    return am.eval()


# -- registration --------------------------------------------------------------------------------
def test_registration_makes_it_a_method_everywhere_and_cleanup_removes_it(registered):
    from lorakit.train.config import TrainConfig, train_methods

    assert METHODS[NAME] is SiluGate
    assert NAME in train_methods() and TrainConfig(method=NAME).method == NAME
    assert config().options == GateOptions(gate=0.5)
    with pytest.raises(lorakit.ConfigError, match=r"SiLU gate \(method 'silu-gate'\) has no option 'scale'; "
                                                  r"its options are gate"):
        config(options={"scale": 2})
    with pytest.raises(lorakit.ConfigError, match="gate must be a positive number"):
        config(options={"gate": -1})
    with pytest.raises(lorakit.ConfigError, match=r"does not support init 'pissa'; it supports 'default'"):
        config(init="pissa")
    unregister_method(NAME)
    with pytest.raises(lorakit.ConfigError, match="unknown method 'silu-gate'"):
        config()
    register_method(SiluGate)  # the fixture's cleanup unregisters it again


def test_a_method_that_claims_what_it_cannot_do_is_refused_at_registration(registered):
    class Mixable(SiluGate):
        method_name = "claims-mixable"
        mixable = True  # but it has no factors()

    with pytest.raises(TypeError, match="mixable but does not implement factors"):
        register_method(Mixable)

    class Impostor(SiluGate):
        up_tensors = ("not_a_tensor",)

    with pytest.raises(TypeError, match="up_tensors"):
        register_method(Impostor)

    class Twin(SiluGate):
        pass

    with pytest.raises(lorakit.ConfigError, match="already registered"):
        register_method(Twin)
    with pytest.raises(lorakit.ConfigError, match="built-in"):
        unregister_method("lora")


def test_it_passes_the_contract_of_every_registered_method(registered, tmp_path):
    torch.manual_seed(0)
    base = ToyNet().eval()
    for i, check in enumerate(CHECKS):
        check(base, NAME, "default", tmp_path / str(i))


# -- training, files -----------------------------------------------------------------------------
def test_it_trains_only_its_own_tensors_from_an_unchanged_start(registered):
    base = tiny_llama(layers=2)
    x = ids()
    with torch.no_grad():
        before = base(input_ids=x).logits
    am = lorakit.adapt(copy.deepcopy(base), config())
    with torch.no_grad():
        assert_close(am(input_ids=x).logits, before, atol=1e-6, rtol=0)  # U = 0: unchanged at init
    assert {n.rsplit(".", 1)[-1] for n, p in am.named_parameters() if p.requires_grad} == {"gate_down", "gate_up"}
    optimizer = torch.optim.AdamW(am.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(am(input_ids=x).logits[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    with torch.no_grad(), am.base_only():  # the base did not move
        assert torch.equal(am(input_ids=x).logits, before)


def test_it_saves_under_lorakits_own_type_and_loads_back_exactly(registered, tmp_path, caplog):
    base = tiny_llama(layers=2)
    am = lorakit.adapt(copy.deepcopy(base), config())
    nudge(am, "default")
    with torch.no_grad():
        expected = am(input_ids=ids()).logits
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        lorakit.save_adapter(am, tmp_path)
    assert "peft_type LORAKIT_SILU_GATE" in caplog.text and "PEFT's loader refuses" in caplog.text
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORAKIT_SILU_GATE" and written["options"] == {"gate": 0.5}
    with (tmp_path / "adapter_model.safetensors").open("rb") as f:
        header = f.read(8 + int.from_bytes(f.read(8), "little"))
    assert b".gate_up" in header and b".gate_down" in header
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    config_back = loaded.configs["default"]
    assert (config_back.method, config_back.r, config_back.alpha, config_back.options) == (NAME, 4, 8, GateOptions(0.5))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids()).logits, expected)
    unregister_method(NAME)  # a lorakit without the method says what the folder is
    try:
        with pytest.raises(lorakit.AdapterFileError, match=r"peft_type 'LORAKIT_SILU_GATE' is not supported "
                                                           r"\(lorakit reads LORA, [^)]*VERA\)") as refused:
            lorakit.load_adapter(copy.deepcopy(base), tmp_path)
        assert "SILU" not in str(refused.value).split("lorakit reads")[1]
    finally:
        register_method(SiluGate)


def test_a_hot_swap_copies_into_it_in_place(registered, tmp_path):
    base = tiny_llama(layers=2)
    am = lorakit.adapt(copy.deepcopy(base), config())
    nudge(am, "default", seed=3)
    lorakit.save_adapter(am, tmp_path / "v2")
    with torch.no_grad():
        v2 = am(input_ids=ids()).logits
    served_model = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "v2", name="team")
    nudge(served_model, "team", seed=4)
    kept = [m.gate_up for m in served_model.adapter_modules("team").values()]
    served_model.replace_adapter("team", tmp_path / "v2")
    assert [m.gate_up for m in served_model.adapter_modules("team").values()] == kept  # same tensors, new values
    with torch.no_grad():
        assert torch.equal(served_model(input_ids=ids()).logits, v2)


# -- what it cannot do: refused first ------------------------------------------------------------
def test_merge_is_refused_before_any_layer_changes(registered):
    am = served()
    before = {k: v.clone() for k, v in am.state_dict().items()}
    with torch.no_grad():
        out = am(input_ids=ids()).logits
    message = r"adapter 'gate' \(silu-gate\) cannot be merged: its update is non-linear; serve it unmerged"
    for attempt in (lambda: am.merge(), lambda: am.merge(["lora", "gate"]), lambda: am.merge_and_unload(),
                    lambda: am.unmerge(["gate"])):
        with pytest.raises(lorakit.ConfigError, match=message):
            attempt()
        assert all(layer.merged == [] for layer in am.adapted_layers().values())  # not even the LoRA before it
        assert all(torch.equal(v, before[k]) for k, v in am.state_dict().items())
    with torch.no_grad():
        assert torch.equal(am(input_ids=ids()).logits, out)
    am.merge(["lora"])  # its neighbour still merges
    assert any(layer.merged == ["lora"] for layer in am.adapted_layers().values())


def test_lorakit_merge_refuses_the_folder_before_loading_any_base(registered, tmp_path):
    from lorakit.merge_export import merge_to_folder

    am = lorakit.adapt(tiny_llama(layers=1), config())
    lorakit.save_adapter(am, tmp_path / "gate")
    # The base spec is never read: the refusal comes first.
    with pytest.raises(lorakit.ConfigError, match=r"\(silu-gate\) cannot be merged: its update is non-linear"):
        merge_to_folder("/nonexistent/base", tmp_path / "gate", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_combining_it_is_refused_before_anything_is_built(registered):
    am = served()
    with pytest.raises(lorakit.ConfigError, match=r"adapter 'gate' \(silu-gate\) cannot be combined"):
        combine_adapters(am, ["lora", "gate"], [1.0, 1.0], "both")
    assert "both" not in am.configs


# -- mixed batches -------------------------------------------------------------------------------
def alone(am: lorakit.AdaptedModel, name: str, row: torch.Tensor) -> torch.Tensor:
    if name == "base":
        with am.base_only():
            return am(input_ids=row).logits
    am.set_active(name)
    return am(input_ids=row).logits


@pytest.mark.parametrize("length", [6, 1])  # a prefill, and a decoding step (one token per row)
def test_a_mixed_batch_with_it_and_a_lora_neighbour_equals_each_row_alone(registered, length):
    am = served()
    names = ["lora", "gate", "base", "gate", "lora"]
    x = ids(batch=len(names), seed=5)[:, :length]
    with torch.no_grad():
        mixed = am(input_ids=x, adapter_names=names).logits
        for row, name in enumerate(names):
            assert_close(mixed[row], alone(am, name, x[row:row + 1])[0], atol=1e-5, rtol=1e-5)
        assert (mixed[1] - mixed[2]).abs().max() > 1e-3 and (mixed[0] - mixed[2]).abs().max() > 1e-3
    # The LoRA rows still take the stacked path: the gate holds no slot in any stack.
    stacks = [layer.mix_state.stack for layer in am.adapted_layers().values() if layer.mix_state.stack is not None]
    assert stacks and all("gate" not in stack.slot_of and "lora" in stack.slot_of for stack in stacks)


def test_a_batch_of_lora_rows_only_is_untouched_by_it(registered):
    am = served()
    with torch.no_grad():
        mixed = am(input_ids=ids(batch=2), adapter_names=["lora", "base"]).logits
        assert_close(mixed[0], alone(am, "lora", ids(batch=2)[:1])[0], atol=1e-5, rtol=1e-5)
    assert all(layer.batch_plan is None for layer in am.adapted_layers().values())


# -- a variant PEFT reads as plain LoRA ------------------------------------------------------------
@dataclass(frozen=True)
class SketchOptions:
    sketch: int = 0  # a training-only setting: the forward is LoRA's


class SketchLoRA(LoRA):
    """LoRA's forward and files (PEFT reads them as plain LoRA), with an option of its own, as a
    method that changes only training (a custom backward) would be."""

    method_name = "lora-sketch"
    title = ""
    Options = SketchOptions


def test_a_lora_variant_ships_as_plain_lora_and_comes_back_as_itself(tmp_path):
    register_method(SketchLoRA)
    try:
        torch.manual_seed(0)
        base = ToyNet().eval()
        for i, check in enumerate(CHECKS):  # PEFT loads its folder with equal outputs, among the rest
            check(base, "lora-sketch", "default", tmp_path / str(i))
        am = lorakit.adapt(tiny_llama(layers=1), lorakit.AdapterConfig(method="lora-sketch", r=2, options={"sketch": 5},
                                                                       target_modules=["q_proj"]))
        lorakit.save_adapter(am, tmp_path / "sketch")
        assert json.loads((tmp_path / "sketch" / "adapter_config.json").read_text())["peft_type"] == "LORA"
        back = lorakit.load_adapter(tiny_llama(layers=1), tmp_path / "sketch").configs["default"]
        assert back.method == "lora-sketch" and back.options == SketchOptions(sketch=5)
    finally:
        unregister_method("lora-sketch")


# -- LoRA+ ---------------------------------------------------------------------------------------
def test_loraplus_puts_its_declared_up_tensor_in_the_fast_group(registered):
    am = served()
    am.set_active("lora", "gate")
    for name in ("lora", "gate"):
        am.freeze_adapter(name, False)
    groups = lorakit.loraplus_param_groups(am, lr=1e-3, ratio=16)
    slow, fast = ({id(p) for p in g["params"]} for g in groups)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    for method in am.adapter_modules("gate").values():
        assert id(method.gate_up) in fast and id(method.gate_down) in slow
    for method in am.adapter_modules("lora").values():
        assert id(method.lora_B) in fast and id(method.lora_A) in slow


def test_lorakit_eval_reports_that_it_ships_unmerged_instead_of_a_parity(registered):
    from lorakit.evaluation.parity import parity
    from lorakit.evaluation.report_files import summary_lines

    am = lorakit.adapt(tiny_llama(layers=1), config())
    nudge(am, "default")
    batch = {"input_ids": ids(), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    found = parity(am, "default", batch)
    assert found["max_logit_diff"] is None and found["mergeable"] is False
    assert "cannot be merged: its update is non-linear" in found["note"]
    report = {"model": "m", "task_kind": "causal-lm", "shipped": "gate", "cost": {"seconds": 1, "forward_passes": 2,
                                                                                  "device": "cpu"},
              "candidates": {"gate": {"tasks": {}, "keep": {"source": "k", "flips_right_to_wrong": 0,
                                                            "flips_wrong_to_right": 0, "examples": 1,
                                                            "base_correct": 1, "mean_kl": 0.0, "kl_unit": "token"},
                                      "parity": found}}}
    assert any("it ships unmerged" in line for line in summary_lines(report))
