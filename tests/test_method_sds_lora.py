"""SDS-LoRA: LoRA's forward and files, with ∇B = G Q_A and ∇A = Q_Bᵀ G (lorakit.methods.sds_lora).

The yardstick is written here in float64 without lorakit's maths: G = ∂L/∂(B A) of every adapted
layer comes from autograd on a copy of the base with s·B A added into its weights (so G is formed
explicitly, which the method never does), and the orthonormal bases come from a Cholesky
factorisation (Aᵀ = Q R with R = chol(A Aᵀ)ᵀ: the thin QR with a positive diagonal), not from a QR.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from model_zoo import ToyNet, tiny_llama, toy_inputs
from test_methods import randomise
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit.cli import main
from lorakit.methods import METHODS, LoRA
from lorakit.methods.sds_lora import SDSLoRA, orthonormal_basis

TOY_TARGETS = ["emb", "lin", "c1d", "conv"]  # the linear-convention kinds and the two with their own down/up
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to:UserWarning")


# -- the float64 yardstick -------------------------------------------------------------------------
def basis(M: torch.Tensor) -> torch.Tensor:
    """Q of the thin QR M = Q R with diag(R) > 0, via R = chol(MᵀM)ᵀ and Q = M R⁻¹."""
    R = torch.linalg.cholesky(M.T @ M).T
    return torch.linalg.solve_triangular(R, M, upper=True, left=False)


def explicit_gradient(am: lorakit.AdaptedModel, base: nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    """G = ∂L/∂(B A) (out, in) per adapted module: autograd on the base with s·B A (+ offset) merged in."""
    merged = copy.deepcopy(base).double()
    modules = am.adapter_modules("default")
    weights = {}
    with torch.no_grad():
        for path, method in modules.items():
            weight = merged.get_submodule(path).weight
            A, B = method.lora_A.double(), method.lora_B.double()
            delta = method.scaling * B @ A + method.offset_B.double() @ method.offset_A.double()
            method.kind.as_matrix(weight).add_(delta)
            weights[path] = weight.requires_grad_()
    loss_fn(merged).backward()
    return {path: modules[path].scaling * modules[path].kind.as_matrix(w.grad) for path, w in weights.items()}


def reference_gradients(am, base, loss_fn) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(∇A, ∇B) = (Q_Bᵀ G, G Q_A) for every adapted module."""
    G = explicit_gradient(am, base, loss_fn)
    out = {}
    for path, method in am.adapter_modules("default").items():
        A, B = method.lora_A.detach().double(), method.lora_B.detach().double()
        out[path] = basis(B).T @ G[path], G[path] @ basis(A.T)
    return out


def lorakit_gradients(am, loss_fn) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    am.zero_grad(set_to_none=True)
    loss_fn(am).backward()
    return {path: (m.lora_A.grad, m.lora_B.grad) for path, m in am.adapter_modules("default").items()}


def toy(method: str = "sds-lora", init: str = "default", dtype=torch.float64, seed: int = 1):
    torch.manual_seed(0)
    base = ToyNet().eval().to(dtype)
    am = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(method=method, init=init, r=3, alpha=5,
                                                                  target_modules=TOY_TARGETS))
    am.to(dtype)
    randomise(am, seed=seed)
    return base, am.train()


def toy_loss(dtype=torch.float64):
    ids, image = toy_inputs()
    return lambda model: model(ids, image.to(dtype)).square().sum()


def llama(method: str = "sds-lora", dtype=torch.float64, randomised: bool = True):
    base = tiny_llama(layers=2).to(dtype)
    am = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(method=method, r=4, alpha=8,
                                                                  target_modules=LLAMA_TARGETS))
    am.to(dtype)
    if randomised:
        randomise(am, seed=2)
    return base, am.train()


def llama_loss(batch: int = 3, seed: int = 1):
    ids = torch.randint(0, 128, (batch, 8), generator=torch.Generator().manual_seed(seed))

    def loss(model):
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return loss


def assert_gradients_match(got, expected, tol: float = 1e-10) -> None:
    assert got.keys() == expected.keys()
    for path in expected:
        for name, g, e in zip(("lora_A", "lora_B"), got[path], expected[path], strict=True):
            assert g is not None, f"{path}.{name} received no gradient"
            assert_close(g.double(), e, atol=tol * max(e.abs().max().item(), 1.0), rtol=0, msg=f"{path}.{name}")


# -- the rule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["default", "pissa"])  # pissa: a frozen offset in the forward too
def test_gradients_are_sds_on_every_layer_kind(init):
    base, am = toy(init=init)
    loss = toy_loss()
    expected = reference_gradients(am, base, loss)
    assert_gradients_match(lorakit_gradients(am, loss), expected)
    # ... which is not LoRA's (the test would catch a method that kept LoRA's backward)
    for path, method in am.adapter_modules("default").items():
        G = explicit_gradient(am, base, loss)[path]
        assert (G @ method.lora_A.detach().T - expected[path][1]).abs().max() > 1e-3


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_the_input_gradient_stays_loras_through_a_kind_with_its_own_down_and_up(init):
    """Two adapted convolutions in a row: the first one's gradients hold only if the second passes
    its input the true gradient (LoRA's, offset included)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 3, stride=2)).double().eval()
    am = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(init=init, method="sds-lora", r=2, alpha=3,
                                                                  target_modules=["0", "2"]))
    am.to(torch.float64)
    randomise(am, seed=3)
    image = torch.randn(2, 3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(model):
        return model(image).square().sum()

    assert_gradients_match(lorakit_gradients(am.train(), loss), reference_gradients(am, base, loss))


def test_training_through_the_model_takes_the_sds_path_not_loras_fused_node():
    """Bias-free Linears in training are where LoRA runs its one-node fused path (lorakit.fused),
    whose backward is LoRA's: SDS-LoRA's gradients must still come out."""
    base, am = llama()
    loss = llama_loss()
    assert_gradients_match(lorakit_gradients(am, loss), reference_gradients(am, base, loss))
    assert all(m.fused_factors() is None for m in am.adapter_modules("default").values())
    am.freeze_adapter("default")  # frozen: nothing of SDS's to do, LoRA's fused path is back
    assert all(m.fused_factors() is not None for m in am.adapter_modules("default").values())


def test_orthonormal_factors_get_exactly_loras_gradients():
    """R_A = R_B = I (a positive diagonal, whatever signs the QR routine picks): SDS = LoRA."""
    _, am = llama()
    _, lora_am = llama("lora")
    with torch.no_grad():
        for path, method in am.adapter_modules("default").items():
            signs = torch.tensor([1.0, -1.0] * (method.rank // 2), dtype=torch.float64)  # either diagonal sign
            method.lora_A.copy_((torch.linalg.qr(method.lora_A.T)[0] * signs).T)
            method.lora_B.copy_(torch.linalg.qr(method.lora_B)[0] * signs)
            other = lora_am.adapter_modules("default")[path]
            other.lora_A.copy_(method.lora_A)
            other.lora_B.copy_(method.lora_B)
    loss = llama_loss()
    assert_gradients_match(lorakit_gradients(am, loss), lorakit_gradients(lora_am, loss))


def test_a_rank_deficient_factor_passes_loras_gradient_to_the_other():
    """B of rank < r (B = 0 at the start): ∇A = Bᵀ G, LoRA's; ∇B stays G Q_A. Likewise for A."""
    base, am = toy()
    with torch.no_grad():
        for method in am.adapter_modules("default").values():
            method.lora_B[:, 1] = method.lora_B[:, 0]  # rank 2 of 3
    loss = toy_loss()
    G = explicit_gradient(am, base, loss)
    got = lorakit_gradients(am, loss)
    for path, method in am.adapter_modules("default").items():
        A, B = method.lora_A.detach(), method.lora_B.detach()
        assert_close(got[path][0], B.T @ G[path], atol=1e-10, rtol=0)
        assert_close(got[path][1], G[path] @ basis(A.T), atol=1e-10, rtol=0)
    with torch.no_grad():
        for method in am.adapter_modules("default").values():
            method.lora_B.normal_()
            method.lora_A[2] = 0.0
    G = explicit_gradient(am, base, loss)
    got = lorakit_gradients(am, loss)
    for path, method in am.adapter_modules("default").items():
        A, B = method.lora_A.detach(), method.lora_B.detach()
        assert_close(got[path][0], basis(B).T @ G[path], atol=1e-10, rtol=0)
        assert_close(got[path][1], G[path] @ A.T, atol=1e-10, rtol=0)


def test_orthonormal_basis_is_the_positive_diagonal_qr_or_the_factor_itself():
    M = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_close(orthonormal_basis(M), basis(M), atol=1e-12, rtol=0)
    assert torch.equal(orthonormal_basis(torch.zeros(9, 3)), torch.zeros(9, 3))
    wide = torch.randn(2, 3)  # r larger than the dimension: rank < r for certain
    assert torch.equal(orthonormal_basis(wide), wide)
    assert orthonormal_basis(torch.randn(9, 3, dtype=torch.bfloat16)).dtype == torch.float32


# -- the B = 0 start -----------------------------------------------------------------------------
def test_from_the_default_start_b_moves_first_then_a_and_the_loss_falls():
    base, am = llama(randomised=False)  # B = 0, A random: the model is the base
    loss = llama_loss()
    with torch.no_grad():
        assert_close(loss(am), loss(base.train()), atol=1e-12, rtol=0)
    G = explicit_gradient(am, base, loss)
    got = lorakit_gradients(am, loss)
    for path, method in am.adapter_modules("default").items():
        assert torch.count_nonzero(got[path][0]) == 0  # ∇A = Bᵀ G = 0, as LoRA's
        assert_close(got[path][1], G[path] @ basis(method.lora_A.detach().T), atol=1e-10, rtol=0)
    optimizer = torch.optim.SGD(am.trainable_parameters(), lr=0.5)
    losses = []
    for step in range(6):
        optimizer.zero_grad()
        value = loss(am)
        value.backward()
        if step == 1:  # B has rank r now: A learns through Q_B
            assert all(m.lora_A.grad.abs().max() > 0 for m in am.adapter_modules("default").values())
            expected = reference_gradients(am, base, loss)
            assert_gradients_match({p: (m.lora_A.grad, m.lora_B.grad)
                                    for p, m in am.adapter_modules("default").items()}, expected)
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < losses[0] - 0.05, losses


# -- LoRA's forward, files, merging, mixing -------------------------------------------------------
def twin_lora(am: lorakit.AdaptedModel, base: nn.Module) -> lorakit.AdaptedModel:
    config = am.configs["default"]
    lora_am = lorakit.adapt(copy.deepcopy(base), config.with_changes(method="lora"))
    lora_am.load_state_dict(am.state_dict())
    return lora_am.train()


def test_the_forward_is_loras_in_training_and_exactly_loras_in_inference():
    torch.manual_seed(0)
    for base, am in (toy(dtype=torch.float32), llama(dtype=torch.float32)):
        lora_am = twin_lora(am, base)
        loss = toy_loss(torch.float32) if isinstance(base, ToyNet) else llama_loss()
        assert_close(loss(am), loss(lora_am), atol=1e-6, rtol=1e-6)  # grad on: SDS's node, LoRA's products
        am.eval()
        lora_am.eval()
        with torch.no_grad():
            assert torch.equal(loss(am), loss(lora_am))  # LoRA's own code


def test_the_layer_output_under_autograd_is_bitwise_loras_generic_path():
    """Inside its node SDS-LoRA runs LoRA's add_update_ as LoRA runs it under autograd (the
    branches for a biased Linear's view output and for 3-d outputs included)."""
    torch.manual_seed(0)
    for bias in (True, False):
        layer = nn.Linear(16, 12, bias=bias)
        x = torch.randn(2, 5, 16, requires_grad=True)
        sds = lorakit.adapt(nn.Sequential(copy.deepcopy(layer)),
                            lorakit.AdapterConfig(method="sds-lora", r=4, target_modules=["0"]))
        randomise(sds)
        method = sds.adapter_modules("default")["0"]
        lora = LoRA(method.kind, 4, method.scaling, 0.0)
        lora.load_state_dict(method.state_dict())
        expected = lora(x, layer(x), layer)  # LoRA's generic path, grad on
        assert torch.equal(sds.model(x), expected)


def test_only_a_and_b_train_and_receive_gradients():
    _, am = toy(dtype=torch.float32)
    toy_loss(torch.float32)(am).backward()
    got = {n.rsplit(".", 1)[-1] for n, p in am.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {"lora_A", "lora_B"}
    assert {n for n, p in am.named_parameters() if p.requires_grad} == \
        {f"model.{t}.adapters.default.lora_{x}" for t in TOY_TARGETS for x in "AB"}


def test_bf16_autocast_trains_float32_factors_with_sds_gradients():
    """Under autocast (lorakit train --bf16 on) the products run in bf16 and the float32 factors
    get float32 gradients close to the float64 rule: one layer, so bf16 rounding is all there is."""
    torch.manual_seed(0)
    am = lorakit.adapt(nn.Sequential(nn.Linear(64, 48)), lorakit.AdapterConfig(method="sds-lora", r=4,
                                                                               target_modules=["0"]))
    randomise(am)
    method = am.adapter_modules("default")["0"]
    x = torch.randn(3, 10, 64, requires_grad=True)
    c = torch.randn(3, 10, 48)  # L = Σ c ⊙ y: ∂L/∂y = c exactly
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = am(x)
    assert y.dtype == torch.bfloat16
    (y.float() * c).sum().backward()
    G = method.scaling * c.reshape(-1, 48).double().T @ x.detach().reshape(-1, 64).double()
    A, B = method.lora_A.detach().double(), method.lora_B.detach().double()
    for got, expected in ((method.lora_A.grad, basis(B).T @ G), (method.lora_B.grad, G @ basis(A.T))):
        assert got.dtype == torch.float32
        assert (got.double() - expected).norm() < 0.02 * expected.norm()
    assert x.grad.dtype == torch.float32


def test_saved_as_plain_lora_loaded_back_exactly_and_peft_reads_it(tmp_path):
    peft = pytest.importorskip("peft")
    base, am = llama(dtype=torch.float32)
    am.eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = am(input_ids=ids).logits
        assert (ours - base(input_ids=ids).logits).abs().max() > 1e-3
    lorakit.save_adapter(am, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    assert loaded.configs["default"].method == "sds-lora"
    assert isinstance(next(iter(loaded.adapter_modules("default").values())), SDSLoRA)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ours)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert_close(theirs(input_ids=ids).logits, ours, atol=1e-5, rtol=0)


def test_merge_and_unmerge_are_exact():
    _, am = toy(dtype=torch.float32)
    am.eval()
    ids, image = toy_inputs()

    def base_weights():
        return {k: v.clone() for k, v in am.state_dict().items() if "adapters" not in k}

    before = base_weights()
    with torch.no_grad():
        unmerged = am(ids, image)
        am.merge()
        assert any(not torch.equal(v, before[k]) for k, v in base_weights().items())
        assert_close(am(ids, image), unmerged, atol=1e-5, rtol=0)
        am.unmerge()
        for k, v in base_weights().items():
            assert_close(v, before[k], atol=1e-6 * max(before[k].abs().max().item(), 1.0), rtol=1e-6)
        assert_close(am(ids, image), unmerged, atol=1e-5, rtol=0)


def test_a_mixed_batch_stacks_it_beside_a_lora_and_matches_each_row_alone():
    _, am = llama(dtype=torch.float32)
    am.add_adapter("plain", lorakit.AdapterConfig(r=2, target_modules=["q_proj"]))
    randomise(am, seed=5)
    am.eval()
    names = ["default", "plain", "default"]
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mixed = am(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            am.set_active(name)
            assert_close(mixed[row], am(input_ids=ids[row:row + 1]).logits[0], atol=1e-5, rtol=1e-5)
    stacks = [layer.mix_state.stack for layer in am.adapted_layers().values() if layer.mix_state.stack is not None]
    assert stacks and all("default" in stack.slot_of for stack in stacks)


def test_registered_with_loras_capabilities():
    cls = METHODS["sds-lora"]
    assert cls is SDSLoRA and issubclass(cls, LoRA)
    assert (cls.file_type(), cls.mergeable, cls.mixable, cls.combinable) == ("LORA", True, True, True)


# -- lorakit train ---------------------------------------------------------------------------------
def test_lorakit_train_with_sds_lora_reduces_the_loss(tmp_path):
    rows = [{"prompt": f"Q{i % 4}: ", "completion": f"answer {i % 4}"} for i in range(32)]
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--task", "causal-lm", "--model",
                 "random:llama,hidden=32,layers=1,heads=2,kv_heads=2,intermediate=64", "--data", str(data),
                 "--out", str(out), "--method", "sds-lora", "--max-steps", "12", "--batch-size", "8",
                 "--lr", "1e-2", "--targets", "all-linear", "--bf16", "off"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "sds-lora"
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
