"""The same contract on a CUDA device: adapters live where the base lives and compute what they do on the CPU.

Skipped without a GPU (CI has none); run on one with ``pytest tests/test_cuda.py``. Each test
builds the model on the CPU, where the reference is computed, and moves a copy to the GPU, so
both sides hold the very same tensors. TF32 is off, so float32 matrix products on the GPU are
true float32 and the tolerances are float32's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from model_zoo import tiny_llama
from test_fused import fused_step_equals_generic, saved_against_bare_base
from test_methods import randomise
from torch.testing import assert_close

import lorakit
import lorakit.layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
METHODS = {  # name -> AdapterConfig fields
    "lora": {"method": "lora"},
    "rslora": {"method": "lora", "use_rslora": True},
    "lora-fa": {"method": "lora-fa"},
    "vera": {"method": "vera"},
    "dora": {"method": "dora"},
    "pissa": {"method": "lora", "init": "pissa"},
}


@pytest.fixture(autouse=True)
def exact_float32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def ids(batch: int = 3, seq: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def adapted(case: str, *, r: int = 4, seed: int = 1) -> lorakit.AdaptedModel:
    """A tiny Llama on the CPU with adapter ``case`` on every linear, its tensors random (B small)."""
    am = lorakit.adapt(tiny_llama(layers=2), lorakit.AdapterConfig(r=r, alpha=8, target_modules="all-linear",
                                                                   **METHODS[case]))
    randomise(am, seed=seed)
    with torch.no_grad():
        for name, p in am.named_parameters():
            if name.endswith(("lora_B", "vera_lambda_b")):
                p.mul_(0.1)
    return am.eval()


def logits(model, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=tokens.to(device), **kwargs).logits.float().cpu()


def assert_each_row_alone(am: lorakit.AdaptedModel, tokens: torch.Tensor, names: list[str | None],
                          mixed: torch.Tensor) -> None:
    """Row i of the mixed batch's logits equals row i run alone through adapter names[i] (None: base)."""
    for row, name in enumerate(names):
        if name is None:
            with am.base_only():
                alone = logits(am, tokens[row:row + 1])
        else:
            am.set_active(name)
            alone = logits(am, tokens[row:row + 1])
        assert_close(mixed[row], alone[0], atol=1e-5, rtol=1e-5, msg=f"row {row} ({name})")


def adapter_devices(am: lorakit.AdaptedModel) -> set[torch.device]:
    return {t.device for m in am.adapted_layers().values() for a in m.adapters.values()
            for t in (*a.parameters(), *a.buffers())}


@pytest.mark.parametrize("case", list(METHODS))
def test_adapter_built_on_a_cuda_base_lives_there_and_starts_as_the_identity(case):
    base = tiny_llama(layers=2).to(CUDA)
    expected = logits(base, ids())
    am = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(r=4, target_modules="all-linear", **METHODS[case]))
    assert adapter_devices(am) == {torch.device("cuda", 0)}
    if case != "pissa":  # PiSSA moves W's top singular part into the adapter: equal only to rounding
        assert_close(logits(am, ids()), expected, atol=1e-5, rtol=0)
    else:
        assert_close(logits(am, ids()), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(METHODS))
def test_cuda_forward_merge_and_unmerge_match_the_cpu(case):
    cpu = adapted(case)
    gpu = copy.deepcopy(cpu).to(CUDA)
    want = logits(cpu, ids())
    with cpu.base_only():
        assert (want - logits(cpu, ids())).abs().max() > 1e-3, "the adapter must change the output"
    assert_close(logits(gpu, ids()), want, atol=1e-4, rtol=1e-4)
    weights = {k: v.clone() for k, v in gpu.state_dict().items() if "adapters" not in k}
    gpu.merge()
    assert_close(logits(gpu, ids()), want, atol=1e-4, rtol=1e-4)
    gpu.unmerge()
    for k, v in gpu.state_dict().items():
        if k in weights:
            assert_close(v, weights[k], atol=1e-6, rtol=1e-6, msg=k)


def test_bf16_base_on_cuda_unmerges_bit_exactly():
    """A bf16 merge rounds W + ΔW; un-merging must give back the very bits of W."""
    am = adapted("lora").to(CUDA)
    am.model.to(torch.bfloat16)
    before = {k: v.clone() for k, v in am.model.state_dict().items() if v.dtype == torch.bfloat16}
    am.merge()
    changed = [k for k, v in am.model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "the merge must change W, or this proves nothing"
    am.unmerge()
    for k, v in am.model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k


def test_mixed_batch_on_cuda_equals_each_row_alone():
    am = adapted("lora")
    am.add_adapter("dora", lorakit.AdapterConfig(method="dora", r=3, target_modules="all-linear"))
    am.add_adapter("vera", lorakit.AdapterConfig(method="vera", r=8, target_modules=["q_proj", "o_proj"]))
    am.add_adapter("wide", lorakit.AdapterConfig(r=16, alpha=4, target_modules=["k_proj", "up_proj"]))
    randomise(am, seed=5)
    with torch.no_grad():
        for name, p in am.named_parameters():
            if name.endswith(("lora_B", "vera_lambda_b")):
                p.mul_(0.1)
    gpu = am.to(CUDA).eval()
    names = ["default", "dora", None, "vera", "wide", "dora", "default"]
    for length in (9, 1):  # gathered factors; one token per row (a decoding step) reads them in place
        tokens = ids(batch=len(names), seq=length, seed=3)
        mixed = logits(gpu, tokens, adapter_names=names)
        assert_each_row_alone(gpu, tokens, names, mixed)


@pytest.mark.parametrize(("method", "dropout"), [("lora", 0.0), ("vera", 0.0), ("dora", 0.0), ("lora", 0.2)])
def test_fused_training_step_on_cuda_equals_the_generic_path(method, dropout, monkeypatch):
    """float64; with dropout the node draws its mask with nn.Dropout's CUDA kernel, so the masks agree."""
    fused_step_equals_generic(ids(seed=4).to(CUDA), monkeypatch, method=method, dropout=dropout)


@pytest.mark.parametrize("case", ["lora", "lora-fa", "vera", "dora"])
def test_fused_step_on_a_bf16_base_with_float32_adapters_is_as_accurate_as_the_generic_path(case, monkeypatch):
    """The GPU setup of BENCHMARKS.md §7. Both paths run bf16 products on cast factors, rounding in
    different places, so each is compared with the same model run in float64: the fused gradients
    must be about as close to it as the generic path's (measured on a CPU: within 1.2× of them)."""
    def step(dtype_run: str) -> tuple[float, dict[str, torch.Tensor]]:
        am = lorakit.adapt(tiny_llama(layers=2).to(torch.bfloat16),
                           lorakit.AdapterConfig(r=4, alpha=8, target_modules="all-linear", **METHODS[case]))
        randomise(am, seed=1)
        with torch.no_grad():
            for name, p in am.named_parameters():
                if name.endswith(("lora_B", "vera_lambda_b")):
                    p.mul_(0.1)
        am.to(CUDA).train()
        if dtype_run == "float64":
            am.double()
        assert dtype_run == "float64" or all(p.dtype == torch.float32 for p in am.parameters() if p.requires_grad)
        with monkeypatch.context() as patch:
            if dtype_run != "fused":  # the float64 reference runs the generic path too
                patch.setattr(lorakit.layer, "fused_linear", lambda *args: None)
            tokens = ids().to(CUDA)
            loss = am(input_ids=tokens, labels=tokens).loss
            loss.backward()
        return loss.item(), {n: p.grad.double() for n, p in am.named_parameters() if p.requires_grad}

    loss_exact, exact = step("float64")
    loss, fused = step("fused")
    loss_generic, generic = step("generic")
    assert loss == pytest.approx(loss_exact, rel=1e-2) and loss_generic == pytest.approx(loss_exact, rel=1e-2)
    assert fused.keys() == generic.keys() == exact.keys()
    for name, want in exact.items():
        err_fused = ((fused[name] - want).norm() / want.norm()).item()
        err_generic = ((generic[name] - want).norm() / want.norm()).item()
        assert err_fused <= 2 * err_generic + 1e-2, (name, err_fused, err_generic)


def test_saved_for_backward_on_cuda_is_within_ten_percent_of_the_bare_base():
    saved_against_bare_base(CUDA)


@pytest.mark.parametrize("case", ["lora", "dora", "vera", "lora-fa"])
def test_gradients_reach_exactly_the_trainable_tensors_under_bf16_autocast(case):
    am = adapted(case).to(CUDA).train()
    tokens = ids().to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = am(input_ids=tokens, labels=tokens).loss
    loss.backward()
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    got = {n for n, p in am.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable and got == trainable
    assert all(p.dtype == torch.float32 for n, p in am.named_parameters() if n in trainable)


def test_adapter_saved_on_cuda_loads_on_cpu_and_back(tmp_path):
    gpu = adapted("dora").to(CUDA)
    folder = lorakit.save_adapter(gpu, tmp_path / "a")
    base_cpu = tiny_llama(layers=2)
    on_cpu = lorakit.load_adapter(copy.deepcopy(base_cpu), folder)
    on_gpu = lorakit.load_adapter(copy.deepcopy(base_cpu).to(CUDA), folder)
    assert adapter_devices(on_gpu) == {torch.device("cuda", 0)}
    want = logits(gpu, ids())
    assert_close(logits(on_cpu, ids()), want, atol=1e-4, rtol=1e-4)
    assert_close(logits(on_gpu, ids()), want, atol=1e-5, rtol=1e-5)


def test_peft_loads_a_lorakit_file_on_cuda(tmp_path):
    peft = pytest.importorskip("peft")
    am = adapted("lora")
    folder = lorakit.save_adapter(am, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(layers=2).to(CUDA), str(folder)).eval()
    assert_close(logits(theirs, ids()), logits(am, ids()), atol=1e-4, rtol=1e-4)


def test_qlora_on_cuda_trains_the_adapter_and_merge_and_unload_dequantises():
    pytest.importorskip("bitsandbytes")
    from lorakit.quantize import quantize_model

    base = quantize_model(tiny_llama(layers=2).to(CUDA), "nf4", compute_dtype=torch.bfloat16)
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    am = lorakit.adapt(base, lorakit.AdapterConfig(r=4, target_modules="all-linear")).train()
    randomise(am, seed=2)
    tokens = ids().to(CUDA)
    loss = am(input_ids=tokens, labels=tokens).loss
    loss.backward()
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert trainable and {n for n, p in am.named_parameters() if p.grad is not None} == trainable
    assert all("adapters" in n for n in trainable)
    am.eval()
    adapted_out = logits(am, tokens)
    plain = am.merge_and_unload()
    assert not any(type(m).__name__ == "Linear4bit" for m in plain.modules())
    assert_close(logits(plain, tokens), adapted_out, atol=5e-2, rtol=5e-2)  # bf16 compute on both sides


def test_mixed_batch_with_saved_heads_on_cuda():
    """``modules_to_save`` copies (classifier heads) pick their rows on the module's device."""
    am = lorakit.adapt(tiny_llama(layers=1), lorakit.AdapterConfig(r=2, target_modules=["q_proj"],
                                                                   modules_to_save=["lm_head"]), "a")
    am.add_adapter("b", lorakit.AdapterConfig(r=3, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    randomise(am, seed=6)
    with torch.no_grad():
        for name, p in am.named_parameters():
            if "copies" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))).to(p.device) * 0.1)
    gpu = am.to(CUDA).eval()
    names = ["b", None, "a", "b"]
    tokens = ids(batch=len(names), seed=8)
    mixed = logits(gpu, tokens, adapter_names=names)
    assert_each_row_alone(gpu, tokens, names, mixed)
