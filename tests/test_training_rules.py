"""Training-time rules: Delta-LoRA's moving base, LoRA+ groups, LoRA-FA's frozen A, one step each."""

from __future__ import annotations

import copy

import pytest
import torch
from test_methods import randomise
from torch import nn
from torch.testing import assert_close

import lorakit


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    return model, x, y


def step(am, opt, x, y) -> None:
    opt.zero_grad()
    (am(x) - y).pow(2).mean().backward()
    opt.step()


def test_delta_lora_telescoped_identity_and_export(tmp_path):
    model, x, y = model_and_data()
    original = copy.deepcopy(model)
    am = lorakit.adapt(model, lorakit.AdapterConfig(r=3, alpha=6, target_modules=["0", "2"]))
    opt = torch.optim.Adam(am.trainable_parameters(), lr=1e-2)
    rule = lorakit.DeltaLoRA(am, c=2.0, start_step=3)
    methods = am.adapter_modules("default")
    layers = am.adapted_layers()
    W_at = {}
    for t in range(1, 9):
        step(am, opt, x, y)
        rule.step()
        if t == 2:
            W_initial = {p: layers[p].base_layer.weight.detach().clone() for p in layers}
        if t == 3:  # step K: W_K and B_K A_K recorded
            W_at = {p: layers[p].base_layer.weight.detach().clone() for p in layers}
            BA_K = {p: (m.lora_B @ m.lora_A).detach().clone() for p, m in methods.items()}
    for p, m in methods.items():
        assert torch.equal(W_initial[p], original.get_submodule(p).weight)  # nothing moves before K
        moved = layers[p].base_layer.weight.detach() - W_at[p]
        expected = 2.0 * m.scaling * ((m.lora_B @ m.lora_A).detach() - BA_K[p])
        assert moved.abs().max() > 1e-4
        assert_close(moved, expected, atol=1e-6, rtol=1e-5)
    # The file reproduces the trained model on the untouched original base.
    trained = am(x)
    lorakit.save_adapter(am, tmp_path)
    loaded = lorakit.load_adapter(copy.deepcopy(original), tmp_path)
    assert_close(loaded(x), trained, atol=1e-5, rtol=0)
    # Deleting the adapter puts the original base back.
    am.delete_adapter("default")
    for p in layers:
        assert_close(layers[p].base_layer.weight, original.get_submodule(p).weight, atol=1e-6, rtol=0)


def test_delta_lora_refuses_non_lora_adapters():
    model, _, _ = model_and_data()
    am = lorakit.adapt(model, lorakit.AdapterConfig(method="dora", target_modules=["0"]))
    with pytest.raises(lorakit.ConfigError, match="plain LoRA"):
        lorakit.DeltaLoRA(am)


def test_loraplus_groups_and_one_step_against_reference():
    model, x, y = model_and_data()
    am = lorakit.adapt(model, lorakit.AdapterConfig(r=2, target_modules=["0", "2"]))
    randomise(am)
    groups = lorakit.loraplus_param_groups(am, lr=1e-3, ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    a_ids = {id(p) for p in groups[0]["params"]}
    b_ids = {id(p) for p in groups[1]["params"]}
    for m in am.adapter_modules("default").values():
        assert id(m.lora_A) in a_ids and id(m.lora_B) in b_ids
    before = {n: p.detach().clone() for n, p in am.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(groups)
    step(am, opt, x, y)
    for n, p in am.named_parameters():
        if p.requires_grad:
            lr = 16e-3 if n.endswith("lora_B") else 1e-3
            assert_close(p.detach(), before[n] - lr * p.grad, atol=1e-7, rtol=0)


def test_lora_fa_keeps_a_fixed_and_trains_b():
    model, x, y = model_and_data()
    am = lorakit.adapt(model, lorakit.AdapterConfig(method="lora-fa", r=2, target_modules=["0", "2"]))
    A0 = {p: m.lora_A.detach().clone() for p, m in am.adapter_modules("default").items()}
    opt = torch.optim.SGD(am.trainable_parameters(), lr=0.1)
    for _ in range(3):
        step(am, opt, x, y)
    for p, m in am.adapter_modules("default").items():
        assert torch.equal(m.lora_A, A0[p]) and m.lora_A.grad is None
        assert m.lora_B.abs().sum() > 0
