"""Initialisations: default, Gaussian, PiSSA and gradient-SVD."""

from __future__ import annotations

import json

import pytest
import reference as ref
import torch
from torch import nn
from torch.testing import assert_close

import lorakit


def layer_model(out_f: int = 24, in_f: int = 32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f))


def test_default_init_is_kaiming_a_and_zero_b():
    am = lorakit.adapt(layer_model(in_f=400), lorakit.AdapterConfig(r=16, target_modules=["0"]))
    m = am.adapter_modules("default")["0"]
    assert torch.count_nonzero(m.lora_B) == 0
    bound = 1 / 400**0.5  # kaiming_uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound


def test_gaussian_init():
    am = lorakit.adapt(layer_model(in_f=2000), lorakit.AdapterConfig(r=4, init="gaussian", target_modules=["0"]))
    m = am.adapter_modules("default")["0"]
    assert torch.count_nonzero(m.lora_B) == 0
    assert m.lora_A.std().item() == pytest.approx(1 / 4, rel=0.05)


def test_pissa_factors_are_the_principal_part_and_w_is_untouched(tmp_path):
    model = layer_model()
    W0 = model[0].weight.detach().clone()
    x = torch.randn(5, 32)
    y0 = model(x)
    am = lorakit.adapt(model, lorakit.AdapterConfig(r=4, alpha=8, init="pissa", target_modules=["0"]))
    m = am.adapter_modules("default")["0"]
    assert_close((m.scaling * m.lora_B @ m.lora_A).double(), ref.rank_r_svd(W0, 4), atol=1e-5, rtol=0)
    assert torch.equal(am.model[0].base_layer.weight, W0)  # no residual written into the base
    assert_close(am(x), y0, atol=1e-5, rtol=0)
    # Exported as a plain LoRA of rank 2r whose update is zero at step 0.
    lorakit.save_adapter(am, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == pytest.approx(2.0 * 8)


def low_rank_task(seed: int = 0):
    """y = (W0 + U Vᵀ) x: the update the task needs has rank 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g)
    U, V = torch.randn(24, 2, generator=g), torch.randn(32, 2, generator=g)
    return x, U @ V.T * 0.3


def train(init: str, steps: int = 15) -> float:
    model = layer_model()
    x, delta = low_rank_task()
    y = model(x).detach() + x @ delta.T

    def loss_fn(m):
        return (m(x) - y).pow(2).mean()

    config = lorakit.AdapterConfig(r=2, alpha=2, init=init, target_modules=["0"])
    am = lorakit.adapt(model, config, gradient_loss=loss_fn if init == "gradient-svd" else None)
    opt = torch.optim.SGD(am.trainable_parameters(), lr=0.2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(am).backward()
        opt.step()
    return loss_fn(am).item()


def test_gradient_svd_learns_a_low_rank_update_faster_than_default():
    start = train("default", steps=0)
    default, gradient = train("default"), train("gradient-svd")
    assert train("gradient-svd", steps=0) == pytest.approx(start, rel=1e-5)  # unchanged at step 0
    assert gradient < 0.2 * default, (start, default, gradient)


def test_gradient_svd_aligns_with_the_gradient_and_leaves_no_grads():
    model = layer_model()
    x, delta = low_rank_task()
    y = model(x).detach() + x @ delta.T
    W = model[0].weight

    def loss_fn(m):
        return (m(x) - y).pow(2).mean()

    model.zero_grad()
    loss_fn(model).backward()
    G = W.grad.detach().clone()
    model.zero_grad()
    am = lorakit.adapt(model, lorakit.AdapterConfig(r=2, init="gradient-svd", target_modules=["0"]),
                       gradient_loss=loss_fn)
    m = am.adapter_modules("default")["0"]
    U, _, Vh = torch.linalg.svd(G)
    # B spans the gradient's top left singular vectors, A its top right ones.
    assert_close((U[:, :2].T @ m.lora_B).abs().sum(0), m.lora_B.norm(dim=0), atol=1e-4, rtol=1e-4)
    assert_close((m.lora_A @ Vh[:2].T).abs().sum(1), m.lora_A.norm(dim=1), atol=1e-4, rtol=1e-4)
    assert W.grad is None and not W.requires_grad


def test_gradient_svd_without_a_loss_is_refused():
    with pytest.raises(lorakit.ConfigError, match="gradient_loss"):
        lorakit.adapt(layer_model(), lorakit.AdapterConfig(init="gradient-svd", target_modules=["0"]))
