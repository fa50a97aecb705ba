"""The one-node training path of a low-rank update on a frozen Linear (lorakit.fused).

Outputs and gradients (x, the trainable adapter tensors, a trainable bias) against the naive
formula h = W x + bias + s·B A x written out in float64 autograd, and the cases that must take
the generic path instead.
"""

from __future__ import annotations

import pytest
import torch
from model_zoo import tiny_llama
from test_methods import randomise
from torch import nn
from torch.testing import assert_close

import lorakit
import lorakit.layer

CASES = {  # name -> AdapterConfig fields
    "lora": {"method": "lora"},
    "rslora": {"method": "lora", "use_rslora": True},
    "lora-fa": {"method": "lora-fa"},
    "vera": {"method": "vera"},
    "pissa": {"method": "lora", "init": "pissa"},  # a frozen offset: factors concatenated
}
GENERIC = {  # never fused: its own forward
    "dora": {"method": "dora"},
}


def adapted_linear(case: str, bias: str, **extra) -> tuple[lorakit.AdaptedModel, nn.Linear, object]:
    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("layer", nn.Linear(12, 9, bias=bias != "none"))
    am = lorakit.adapt(holder, lorakit.AdapterConfig(r=4, alpha=6, target_modules=["layer"],
                                                     **({**CASES, **GENERIC}[case] | extra))).double().train()
    randomise(am)
    layer = am.model.layer
    if bias == "trainable":
        layer.base_layer.bias.requires_grad_(True)
    return am, layer.base_layer, am.adapter_modules("default")["layer"]


def naive(x, base: nn.Linear, m, leaves: dict[str, torch.Tensor]) -> torch.Tensor:
    """W x + bias + the update, from the leaves (fresh copies of the adapter tensors)."""
    W = base.weight.detach()
    y = x @ W.T
    if base.bias is not None:
        y = y + leaves.get("bias", base.bias.detach())
    if m.method_name == "vera":
        A = m.projections.vera_A[:, : W.shape[1]]
        B = m.projections.vera_B[: W.shape[0]]
        return y + leaves["vera_lambda_b"] * (((x @ A.T) * leaves["vera_lambda_d"]) @ B.T)
    y = y + m.scaling * (x @ leaves["lora_A"].T) @ leaves["lora_B"].T
    if m.offset_A.shape[0]:
        y = y + (x @ m.offset_A.T) @ m.offset_B.T
    return y


def uses_fused(y: torch.Tensor) -> bool:
    return y.grad_fn is not None and "LowRankLinear" in y.grad_fn.name()


@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)])
def test_fused_matches_naive_formula_in_outputs_and_gradients(case: str, bias: str, shape: tuple) -> None:
    am, base, m = adapted_linear(case, bias)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = am(x)
    assert uses_fused(y)
    names = [n for n in ("lora_A", "lora_B", "vera_lambda_d", "vera_lambda_b") if getattr(m, n, None) is not None]
    ours = {n: getattr(m, n) for n in names if getattr(m, n).requires_grad}
    if bias == "trainable":
        ours["bias"] = base.bias
    leaves = {n: t.detach().clone().requires_grad_(n in ours) for n, t in {**ours, **{
        n: getattr(m, n) for n in names}}.items()}
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = naive(x_ref, base, m, leaves)
    assert_close(y, y_ref, atol=1e-12, rtol=1e-12)

    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *ours.values()], g)
    expected = torch.autograd.grad(y_ref, [x_ref, *(leaves[n] for n in ours)], g)
    assert len(grads) == 1 + len(ours) >= 2
    for name, got, want in zip(["x", *ours], grads, expected, strict=True):
        assert_close(got, want, atol=1e-12, rtol=1e-12, msg=f"gradient of {name}")


def test_only_the_needed_gradients_are_formed() -> None:
    """An input that needs no gradient (the first layer of a model) gets none; frozen A gets none."""
    am, _, m = adapted_linear("lora-fa", "none")
    x = torch.randn(3, 12, dtype=torch.float64)
    y = am(x)
    assert uses_fused(y)
    y.sum().backward()
    assert m.lora_A.grad is None and m.lora_B.grad is not None


@pytest.mark.parametrize("setting", ["dropout", "hook", "pre-hook", "W trainable", "dora", "two adapters", "no_grad",
                                     "autocast"])
def test_generic_path_where_fusing_would_change_something(setting: str) -> None:
    am, base, _ = adapted_linear("dora" if setting == "dora" else "lora", "frozen",
                                 dropout=0.3 if setting == "dropout" else 0.0)
    if setting == "hook":
        base.register_forward_hook(lambda mod, i, out: None)
    if setting == "pre-hook":
        base.register_forward_pre_hook(lambda mod, i: None)
    if setting == "W trainable":
        base.weight.requires_grad_(True)
    if setting == "two adapters":
        am.add_adapter("other", lorakit.AdapterConfig(r=2, target_modules=["layer"]))
        am.double().set_active("default", "other")
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    with torch.set_grad_enabled(setting != "no_grad"), torch.autocast("cpu", enabled=setting == "autocast"):
        assert not uses_fused(am(x))


def test_dropout_in_eval_mode_takes_the_fused_path() -> None:
    am, _, _ = adapted_linear("lora", "none", dropout=0.3)
    am.eval()
    assert uses_fused(am(torch.randn(3, 12, dtype=torch.float64, requires_grad=True)))


def test_training_step_on_a_model_equals_the_generic_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole causal-LM step (float64): same loss and the same gradient of every trainable tensor."""
    fused_step_equals_generic(torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0)), monkeypatch)


def fused_step_equals_generic(ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """One float64 causal-LM step of an all-linear LoRA on ``ids``' device, through the fused path
    and then the generic one: the same loss and the same gradient of every trainable tensor."""
    def grads() -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        am = lorakit.adapt(tiny_llama(seed=0).double(), lorakit.AdapterConfig(r=4, target_modules="all-linear"))
        randomise(am.double())
        am.to(ids.device).train()
        loss = am(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in am.named_parameters() if p.requires_grad}

    fused_outputs: list[torch.Tensor | None] = []
    real = lorakit.layer.fused_linear
    monkeypatch.setattr(lorakit.layer, "fused_linear", lambda *a: fused_outputs.append(real(*a)) or fused_outputs[-1])
    loss, fused = grads()
    assert fused_outputs and all(y is not None for y in fused_outputs), "the fused path was not taken"
    assert all(g.device == ids.device for g in fused.values())
    monkeypatch.setattr(lorakit.layer, "fused_linear", lambda *args: None)
    loss_generic, generic = grads()
    assert loss == pytest.approx(loss_generic, rel=1e-12)
    assert fused.keys() == generic.keys() and len(fused) > 0
    for name in fused:
        assert_close(fused[name], generic[name], atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("case", ["lora", "vera"])
def test_float32_factors_on_a_bf16_layer_take_the_fused_path(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual GPU setup: a bf16 base, float32 adapters. Fused, the products run in bf16 on cast
    factors as on the generic path, and the factors' gradients come back in float32."""
    def run(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        am, base, _ = adapted_linear(case, "frozen")
        am.float()
        base.to(torch.bfloat16)
        x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).requires_grad_(True)
        if not fused:
            monkeypatch.setattr(lorakit.layer, "fused_linear", lambda *args: None)
        y = am(x)
        assert uses_fused(y) == fused and y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        grads = {n: p.grad for n, p in am.named_parameters() if p.requires_grad}
        assert grads and all(g.dtype == torch.float32 for g in grads.values())
        return y.detach().float(), {**grads, "x": x.grad.float()}

    y_fused, fused = run(True)
    y_generic, generic = run(False)
    assert_close(y_fused, y_generic, atol=2e-2, rtol=2e-2)
    assert fused.keys() == generic.keys()
    for name in fused:
        assert_close(fused[name], generic[name], atol=5e-2, rtol=5e-2, msg=name)
