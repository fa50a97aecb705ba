"""Each method's forward against its paper formula (tests/reference.py), on every base layer kind."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import lorakit

METHODS = ["lora", "lora-fa", "dora", "vera"]


def randomise(model: lorakit.AdaptedModel, seed: int = 1) -> None:
    """Give every adapter tensor (frozen ones too) random values, so no term hides at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in name else 0.0))


def single(module: nn.Module, method: str, **config) -> tuple[lorakit.AdaptedModel, object]:
    holder = nn.Sequential()
    holder.add_module("layer", module)
    am = lorakit.adapt(holder, lorakit.AdapterConfig(method=method, target_modules=["layer"], **config))
    randomise(am)
    return am, am.adapter_modules("default")["layer"]


def reference_output(x, W, bias, method_name, m, s):
    """The formula for one method on linear-convention inputs."""
    if method_name == "vera":
        return ref.vera(x, W, bias, m.projections.vera_A, m.projections.vera_B, m.vera_lambda_d, m.vera_lambda_b)
    if method_name == "dora":
        return ref.dora(x, W, bias, m.lora_A, m.lora_B, s, m.lora_magnitude_vector)
    return ref.lora(x, W, bias, m.lora_A, m.lora_B, s)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_formula(method: str, rslora: bool) -> None:
    torch.manual_seed(0)
    am, m = single(nn.Linear(12, 9), method, r=4, alpha=6, use_rslora=rslora)
    s = 1.0 if method == "vera" else (6 / 4**0.5 if rslora else 6 / 4)
    assert m.scaling == pytest.approx(s)
    x = torch.randn(5, 12)
    base = am.model.layer.base_layer
    assert_close(am(x).double(), reference_output(x, base.weight, base.bias, method, m, s), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_conv1d_matches_formula(method: str) -> None:
    """transformers' Conv1D stores W transposed: (in, out)."""
    torch.manual_seed(0)
    am, m = single(Conv1D(9, 12), method, r=3, alpha=5)
    s = 1.0 if method == "vera" else 5 / 3
    x = torch.randn(2, 4, 12)
    base = am.model.layer.base_layer
    expected = reference_output(x.reshape(-1, 12), base.weight.T, base.bias, method, m, s).reshape(2, 4, 9)
    assert_close(am(x).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_embedding_matches_formula(method: str) -> None:
    """An embedding is a linear map of one-hot token vectors with W = weight.T."""
    torch.manual_seed(0)
    am, m = single(nn.Embedding(15, 6), method, r=3, alpha=3)
    s = 1.0  # alpha = r, and VeRA has no scaling
    ids = torch.randint(0, 15, (2, 5))
    onehot = F.one_hot(ids.reshape(-1), 15).double()
    base = am.model.layer.base_layer
    expected = reference_output(onehot, base.weight.T, None, method, m, s).reshape(2, 5, 6)
    assert_close(am(ids).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_conv2d_matches_formula(method: str) -> None:
    """A convolution is linear in its weight: conv(x, W') with W' the method's weight (out, in·kh·kw)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    am, m = single(conv, method, r=2, alpha=4)
    s = 1.0 if method == "vera" else 2.0
    W = conv.weight.reshape(4, -1)
    if method == "dora":
        W_new = ref.dora_weight(W, m.lora_A, m.lora_B, s, m.lora_magnitude_vector)
    elif method == "vera":
        A, B = m.projections.vera_A[:, :27].double(), m.projections.vera_B[:4].double()
        W_new = W.double() + (m.vera_lambda_b.double()[:, None] * B) @ (m.vera_lambda_d.double()[:, None] * A)
    else:
        W_new = W.double() + s * m.lora_B.double() @ m.lora_A.double()
    x = torch.randn(2, 3, 7, 7)
    expected = F.conv2d(x.double(), W_new.reshape(conv.weight.shape), conv.bias.double(), stride=2, padding=1)
    assert_close(am(x).double(), expected, atol=1e-5, rtol=0)


def test_dropout_zero_adds_no_module_and_positive_dropout_is_used() -> None:
    _, m = single(nn.Linear(4, 4), "lora")
    assert isinstance(m.dropout, nn.Identity)
    am2, m2 = single(nn.Linear(4, 4), "lora", dropout=0.5)
    assert isinstance(m2.dropout, nn.Dropout)
    x = torch.randn(64, 4)
    am2.train()
    torch.manual_seed(0)
    a = am2(x)
    torch.manual_seed(1)
    b = am2(x)
    assert not torch.allclose(a, b)  # dropout acts in training
    am2.eval()
    assert_close(am2(x), am2(x))


def test_vera_projections_shared_and_sliced() -> None:
    """One frozen pair for the whole model; each layer uses its top-left slice; d starts at d_initial, b at 0."""
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10))
    am = lorakit.adapt(model, lorakit.AdapterConfig(method="vera", r=4, target_modules=["0", "2"], vera_d_initial=0.25))
    first, second = am.adapter_modules("default").values()
    assert first.projections is second.projections
    assert first.projections.vera_A.shape == (4, 8) and first.projections.vera_B.shape == (10, 4)
    assert_close(first.vera_lambda_d.detach(), torch.full((4,), 0.25))
    assert torch.count_nonzero(second.vera_lambda_b) == 0
    assert not first.projections.vera_A.requires_grad
    # Same seed, same projections; another seed, other projections.
    again = lorakit.adapt(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10)),
                          lorakit.AdapterConfig(method="vera", r=4, target_modules=["0", "2"]))
    other = lorakit.adapt(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10)),
                          lorakit.AdapterConfig(method="vera", r=4, target_modules=["0", "2"], vera_seed=7))
    assert_close(again.vera_projections["default"].vera_A, first.projections.vera_A)
    assert not torch.allclose(other.vera_projections["default"].vera_A, first.projections.vera_A)


class _RecordAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numels: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()]
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # views are free
                self.numels.append((str(func), t.numel()))
        return out


def test_dora_training_step_never_materialises_out_by_in() -> None:
    """DoRA's norm comes from low-rank products: no op during a training step makes an (out, in) tensor."""
    torch.manual_seed(0)
    out_f, in_f, tokens = 96, 80, 4
    am, m = single(nn.Linear(in_f, out_f), "dora", r=4)
    opt = torch.optim.SGD(am.trainable_parameters(), lr=0.1)
    x = torch.randn(tokens, in_f)
    am(x).square().sum().backward()  # warm-up: caches ||W|| rows
    opt.step()
    opt.zero_grad()
    with _RecordAllocations() as rec:
        am(x).square().sum().backward()
    big = [(f, n) for f, n in rec.numels if n >= out_f * in_f]
    assert not big, f"ops that made an out×in tensor: {big}"
    assert m.lora_A.grad is not None and m.lora_magnitude_vector.grad is not None


def test_dora_norm_is_constant_in_backward() -> None:
    """The paper's section 4.3: gradients flow as if ||W + sBA|| were a constant."""
    torch.manual_seed(0)
    am, m = single(nn.Linear(6, 5), "dora", r=2)
    x = torch.randn(3, 6)
    am(x).sum().backward()
    W, b = am.model.layer.base_layer.weight.detach(), am.model.layer.base_layer.bias.detach()
    A = m.lora_A.detach().clone().requires_grad_(True)
    B = m.lora_B.detach().clone().requires_grad_(True)
    mag = m.lora_magnitude_vector.detach().clone().requires_grad_(True)
    V = W + m.scaling * B @ A
    n = V.detach().norm(dim=1, keepdim=True)
    (x @ (mag.unsqueeze(1) * V / n).T + b).sum().backward()
    assert_close(m.lora_A.grad, A.grad, atol=1e-5, rtol=1e-5)
    assert_close(m.lora_B.grad, B.grad, atol=1e-5, rtol=1e-5)
    assert_close(m.lora_magnitude_vector.grad, mag.grad, atol=1e-5, rtol=1e-5)
