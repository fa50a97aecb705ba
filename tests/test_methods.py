"""Each registered method's forward against its paper formula (tests/reference.py), on every base layer kind.

The methods come from the registry; a method registered without a formula here fails the
formula tests until one is written (the yardstick must not come from the implementation).
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.methods import METHODS


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
    if method_name == "gpart":
        return ref.gpart(x, W, bias, m.gpart_theta, s, m.partitions.seed)
    if method_name in ("lora", "lora-fa", "sds-lora"):  # SDS-LoRA changes LoRA's backward only
        return ref.lora(x, W, bias, m.lora_A, m.lora_B, s)
    if method_name == "cera":
        return ref.cera(x, W, bias, m.cera_gate_A, m.cera_A, m.cera_B, s)
    raise AssertionError(f"no reference formula for method {method_name!r}: write its paper formula in "
                         "tests/reference.py and here")


UNSCALED = {"vera", "gpart"}  # their trained vectors carry the scale (GPart: its scale option, 1 by default)


def expected_scaling(method: str, alpha: float, r: int, rslora: bool = False) -> float:
    return 1.0 if method in UNSCALED else (alpha / r**0.5 if rslora else alpha / r)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_formula(method: str, rslora: bool) -> None:
    torch.manual_seed(0)
    am, m = single(nn.Linear(12, 9), method, r=4, alpha=6, use_rslora=rslora)
    s = expected_scaling(method, 6, 4, rslora)
    assert m.scaling == pytest.approx(s)
    x = torch.randn(5, 12)
    base = am.model.layer.base_layer
    assert_close(am(x).double(), reference_output(x, base.weight, base.bias, method, m, s), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_conv1d_matches_formula(method: str) -> None:
    """transformers' Conv1D stores W transposed: (in, out)."""
    torch.manual_seed(0)
    am, m = single(Conv1D(9, 12), method, r=3, alpha=5)
    s = expected_scaling(method, 5, 3)
    x = torch.randn(2, 4, 12)
    base = am.model.layer.base_layer
    expected = reference_output(x.reshape(-1, 12), base.weight.T, base.bias, method, m, s).reshape(2, 4, 9)
    assert_close(am(x).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_embedding_matches_formula(method: str) -> None:
    """An embedding is a linear map of one-hot token vectors with W = weight.T."""
    torch.manual_seed(0)
    am, m = single(nn.Embedding(15, 6), method, r=3, alpha=3)
    s = expected_scaling(method, 3, 3)
    ids = torch.randint(0, 15, (2, 5))
    onehot = F.one_hot(ids.reshape(-1), 15).double()
    base = am.model.layer.base_layer
    expected = reference_output(onehot, base.weight.T, None, method, m, s).reshape(2, 5, 6)
    assert_close(am(ids).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_conv2d_matches_formula(method: str) -> None:
    """A convolution is a linear layer on its input's patches (W (out, in·kh·kw)): the method's
    formula on the unfolded patches, folded back (a non-linear method has no new weight W')."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    am, m = single(conv, method, r=2, alpha=4)
    s = expected_scaling(method, 4, 2)
    W = conv.weight.reshape(4, -1)
    x = torch.randn(2, 3, 7, 7)
    patches = F.unfold(x.double(), 3, padding=1, stride=2).transpose(1, 2)  # (n, 16 positions, in·kh·kw)
    rows = reference_output(patches.reshape(-1, W.shape[1]), W, conv.bias, method, m, s)
    expected = rows.reshape(2, 4, 4, 4).permute(0, 3, 1, 2)  # (n, out, 4, 4)
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
    """One frozen pair for the whole model (its shared state); each layer uses its top-left slice;
    d starts at d_initial, b at 0."""
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10))
    am = lorakit.adapt(model, lorakit.AdapterConfig(method="vera", r=4, target_modules=["0", "2"],
                                                    options={"d_initial": 0.25}))
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
                          lorakit.AdapterConfig(method="vera", r=4, target_modules=["0", "2"],
                                                options={"projection_seed": 7}))
    assert again.shared["default"] is again.adapter_modules("default")["0"].projections
    assert_close(again.shared["default"].vera_A, first.projections.vera_A)
    assert not torch.allclose(other.shared["default"].vera_A, first.projections.vera_A)
    assert other.vera_projections["default"] is other.shared["default"]  # the older name still reads it


def test_vera_options_belong_to_the_method_and_old_keywords_still_work() -> None:
    config = lorakit.AdapterConfig(method="vera", options={"projection_seed": 7, "d_initial": 0.25})
    assert config.options.projection_seed == 7 and config.options.d_initial == 0.25
    # The keywords of earlier versions mean the same options.
    assert lorakit.AdapterConfig(method="vera", vera_seed=7, vera_d_initial=0.25) == config
    assert config.with_changes(vera_seed=3).options.projection_seed == 3
    assert lorakit.AdapterConfig(method="vera").options == lorakit.AdapterConfig(method="vera", options={}).options
    lorakit.AdapterConfig(method="lora", vera_seed=3)  # ignored by other methods, as it always was
    unknown = r"VeRA \(method 'vera'\) has no option 'seed'; its options are projection_seed, d_initial"
    with pytest.raises(lorakit.ConfigError, match=unknown):
        lorakit.AdapterConfig(method="vera", options={"seed": 7})
    with pytest.raises(lorakit.ConfigError, match=r"LoRA \(method 'lora'\) has no option 'd_initial'; it has none"):
        lorakit.AdapterConfig(method="lora", options={"d_initial": 0.1})
    with pytest.raises(lorakit.ConfigError, match="d_initial must be a finite number"):
        lorakit.AdapterConfig(method="vera", options={"d_initial": float("nan")})


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
