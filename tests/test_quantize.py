"""QLoRA: full-precision adapters on a frozen 4-bit NF4 (double-quantised) or 8-bit base.

bitsandbytes' NF4 and int8 layers run on the CPU. Int8 layers in eval mode also quantise their
inputs (LLM.int8), so exact comparisons run in train mode, where they compute with the
dequantised weight (no dropout anywhere here, so train mode is deterministic).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator

import pytest
import torch
from model_zoo import tiny_llama
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit.errors import ConfigError, FingerprintMismatchError
from lorakit.kinds import kind_for
from lorakit.report import count_parameters

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

MODES = ("nf4", "int8")
STORED_DTYPE = {"nf4": torch.uint8, "int8": torch.int8}
LAYER_CLASS = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}
# Largest |W_q − W| as a share of max |W|: NF4's widest gap between levels is 0.28 (of the
# block's absmax), int8 rounds to 1/254 of the row's.
WEIGHT_ERROR = {"nf4": 0.15, "int8": 1 / 200}
LOGIT_ERROR = {"nf4": 0.25, "int8": 0.03}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def llama(seed: int = 0, bias: bool = False) -> nn.Module:
    """tiny_llama, optionally with biases on every linear (bitsandbytes returns a view then)."""
    if not bias:
        return tiny_llama(seed=seed)
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def quantized_llama(mode: str, seed: int = 0, bias: bool = False) -> nn.Module:
    from lorakit.quantize import quantize_model

    return quantize_model(llama(seed, bias), mode)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def linear_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def adapted(mode: str, method: str, bias: bool = False) -> lorakit.AdaptedModel:
    model = lorakit.adapt(quantized_llama(mode, bias=bias),
                          lorakit.AdapterConfig(method=method, r=4, alpha=8, target_modules="all-linear"))
    return model.train()


def train_steps(model: lorakit.AdaptedModel, ids: torch.Tensor, steps: int = 4) -> list[float]:
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.2)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------
# quantising
# ---------------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("mode", MODES)
def test_quantize_model_stores_low_bit_weights_and_keeps_heads(mode, ids):
    fp = tiny_llama().train()
    q = quantized_llama(mode).train()
    fp_modules = dict(fp.named_modules())
    fp_bytes = q_bytes = 0
    for path in linear_paths(fp):
        layer = q.get_submodule(path)
        assert type(layer).__name__ == LAYER_CLASS[mode]
        assert layer.weight.dtype == STORED_DTYPE[mode] and not layer.weight.requires_grad
        if layer.bias is not None:
            assert_close(layer.bias, fp_modules[path].bias)
        fp_bytes += fp_modules[path].weight.nbytes
        q_bytes += layer.weight.nbytes
        # The kind's W is the layer's real weight: the layer computes x @ W.T + b with it ...
        kind = kind_for(layer)
        assert kind is not None and not kind.writable and kind.name == LAYER_CLASS[mode]
        W = kind.weight_matrix(layer)
        x = torch.randn(3, layer.in_features)
        assert_close(layer(x), torch.nn.functional.linear(x, W, layer.bias), atol=1e-5, rtol=0)
        # ... and it is the original weight up to the quantisation step.
        W0 = fp_modules[path].weight.detach()
        assert_close(W, W0, atol=WEIGHT_ERROR[mode] * W0.abs().max().item(), rtol=0)
        assert not torch.equal(W, W0)
    assert q_bytes <= fp_bytes * {"nf4": 1 / 8, "int8": 1 / 4}[mode]
    # Output head and embeddings stay full precision and untouched.
    assert type(q.lm_head) is nn.Linear and torch.equal(q.lm_head.weight, fp.lm_head.weight)
    assert torch.equal(q.model.embed_tokens.weight, fp.model.embed_tokens.weight)
    assert_close(logits(q, ids), logits(fp, ids), atol=LOGIT_ERROR[mode], rtol=0)


@needs_bnb
@pytest.mark.parametrize("mode", MODES)
def test_parameter_counts_match_peft(mode):
    """Params4bit holds two values a byte; both lorakit and PEFT count the values."""
    import peft

    fp_total = count_parameters(tiny_llama())[1]
    model = adapted(mode, "lora")
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.trainable_parameters()) > 0
    assert total == fp_total + trainable
    theirs = peft.get_peft_model(quantized_llama(mode), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert theirs.get_nb_trainable_parameters() == (trainable, total)


def test_missing_bitsandbytes_names_the_install_command(monkeypatch):
    from lorakit.quantize import quantize_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes the import fail
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "nf4")


def test_quantising_an_adapted_model_is_refused():
    from lorakit.quantize import quantize_model

    model = lorakit.adapt(nn.Sequential(nn.Linear(4, 4)), lorakit.AdapterConfig(r=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match="before adding adapters"):
        quantize_model(model, "nf4")


# ---------------------------------------------------------------------------------------------
# training on a quantised base
# ---------------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("mode", MODES)
def test_adapters_train_on_a_quantised_base(mode, method, bias, ids):
    base = logits(quantized_llama(mode, bias=bias).train(), ids)
    model = adapted(mode, method, bias)
    assert {layer.kind.name for layer in model.adapted_layers().values()} == {LAYER_CLASS[mode]}
    assert len(model.adapted_layers()) == len(linear_paths(tiny_llama()))
    assert_close(logits(model, ids), base, atol=1e-6, rtol=0)  # unchanged at initialisation

    model(ids, labels=ids).loss.backward()
    adapter_tensors = {id(p) for p in model.trainable_parameters()}
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == adapter_tensors
    assert all(p.grad.abs().sum() > 0 for m in model.adapter_modules("default").values() for p in [m.lora_B])
    model.zero_grad()

    losses = train_steps(model, ids)
    assert losses[-1] < losses[0] - 1e-3


@needs_bnb
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("mode", MODES)
def test_merge_refuses_and_merge_and_unload_dequantises(mode, method, bias, ids):
    model = adapted(mode, method, bias)
    train_steps(model, ids, steps=2)
    expected = logits(model, ids)
    with pytest.raises(NotImplementedError, match="quantisation grid; use merge_and_unload"):
        model.merge()
    assert all(not layer.merged for layer in model.adapted_layers().values())
    assert_close(logits(model, ids), expected, atol=0, rtol=0)  # a refused merge changed nothing

    with pytest.warns(UserWarning, match=r"merged model is dequantised.*Largest \|ΔW\| from the quantised base: "):
        merged = model.merge_and_unload()
    sources = {type(m).__module__.split(".")[0] for m in merged.modules()}
    assert sources <= {"torch", "transformers"}, sources
    for path in linear_paths(merged):
        assert type(merged.get_submodule(path)) is nn.Linear
        assert merged.get_submodule(path).weight.dtype == torch.float32
    assert_close(logits(merged, ids), expected, atol=1e-4, rtol=0)


@needs_bnb
def test_untargeted_quantised_layers_are_dequantised_too(ids):
    model = lorakit.adapt(quantized_llama("nf4"), lorakit.AdapterConfig(r=4, target_modules=["q_proj"])).train()
    train_steps(model, ids, steps=1)
    expected = logits(model, ids)
    with pytest.warns(UserWarning, match="14 quantised layers are now plain nn.Linear"):
        merged = model.merge_and_unload()
    assert all(type(merged.get_submodule(p)) is nn.Linear for p in linear_paths(merged))
    assert_close(logits(merged, ids), expected, atol=1e-4, rtol=0)


@needs_bnb
def test_pissa_init_reads_the_dequantised_weight(ids):
    base = logits(quantized_llama("nf4").train(), ids)
    model = lorakit.adapt(quantized_llama("nf4"),
                          lorakit.AdapterConfig(r=4, init="pissa", target_modules=["q_proj", "v_proj"])).train()
    assert_close(logits(model, ids), base, atol=1e-5, rtol=0)
    method = model.adapter_modules("default")["model.layers.0.self_attn.q_proj"]
    assert method.lora_B.abs().sum() > 0


@needs_bnb
def test_delta_lora_refuses_a_quantised_base():
    with pytest.raises(ConfigError, match="quantised base cannot hold"):
        lorakit.DeltaLoRA(adapted("nf4", "lora"))


@needs_bnb
def test_cpu_packed_nf4_layout_dequantises():
    """On AVX512-BF16 CPUs bitsandbytes repacks an NF4 weight on an eval forward (quantize_model
    turns that off); the kind still reads a layer someone else quantised and that was repacked."""
    import bitsandbytes.functional as bnb_functional

    layer = quantized_llama("nf4").model.layers[0].mlp.gate_proj
    assert layer.support_avx512bf16_for_cpu is False  # quantize_model turns the repacking off
    has_avx512bf16 = getattr(bnb_functional, "has_avx512bf16", None)
    if has_avx512bf16 is None or not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16; bitsandbytes never repacks here")
    kind = kind_for(layer)
    before = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    layer.support_avx512bf16_for_cpu = True
    layer.eval()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        y = layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu
    W = kind.weight_matrix(layer)
    assert_close(W, before, atol=0.01 * before.abs().max().item(), rtol=0)  # block scales now bf16
    assert_close(y, x @ W.t(), atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_trained_on_nf4_loads_on_full_precision_and_quantised_bases(method, ids, tmp_path):
    import peft

    model = adapted("nf4", method)
    train_steps(model, ids, steps=2)
    trained = logits(model, ids)
    lorakit.save_adapter(model, tmp_path, extra_metadata={"quantize": "nf4"})
    file = lorakit.read_adapter(tmp_path)
    assert file.lorakit["quantize"] == "nf4"
    key = "base_model.model.model.layers.0.self_attn.q_proj."
    assert file.tensors[key + "lora_A.weight"].shape == (4, 64)
    assert file.tensors[key + "lora_B.weight"].shape == (64, 4)

    # The full-precision base it was quantised from: the fingerprint is that of the original weights.
    on_fp = lorakit.load_adapter(tiny_llama(), tmp_path).train()
    for path, method_fp in on_fp.adapter_modules("default").items():
        method_q = model.adapter_modules("default")[path]
        assert_close(method_fp.lora_A, method_q.lora_A.detach(), atol=0, rtol=0)
        assert_close(method_fp.lora_B, method_q.lora_B.detach(), atol=0, rtol=0)
    assert_close(logits(on_fp, ids), trained, atol=LOGIT_ERROR["nf4"], rtol=0)
    with pytest.raises(FingerprintMismatchError):
        lorakit.load_adapter(tiny_llama(seed=1), tmp_path)

    # The quantised base again, with lorakit and with PEFT: the trained model exactly.
    on_q = lorakit.load_adapter(quantized_llama("nf4"), tmp_path).train()
    assert_close(logits(on_q, ids), trained, atol=1e-5, rtol=0)
    with_peft = peft.PeftModel.from_pretrained(quantized_llama("nf4"), tmp_path).train()
    assert_close(logits(with_peft, ids), trained, atol=1e-5, rtol=0)


@needs_bnb
def test_cli_trains_on_an_nf4_base(tmp_path):
    from lorakit.cli import main

    rows = [{"text": f"the {w} sat on the {v} mat"} for w in ("cat", "dog", "owl", "fox") for v in ("red", "blue")]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--model", "random:llama,hidden=64,layers=1,heads=2,kv_heads=2,intermediate=128",
                 "--task", "causal-lm", "--data", str(data), "--quantize", "nf4", "--targets", "all-linear",
                 "--max-steps", "3", "--batch-size", "4", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] > 0
    file = lorakit.read_adapter(out / "adapter")
    assert file.lorakit["quantize"] == "nf4"
    assert len([k for k in file.tensors if k.endswith("lora_A.weight")]) == 7  # q k v o gate up down


@needs_bnb
def test_merge_cli_reports_the_quantised_training_base(tmp_path, capsys):
    """`lorakit merge` of a QLoRA adapter merges into the full-precision base and says so."""
    from test_train import write_classification

    from lorakit.cli import main

    train = write_classification(tmp_path / "train.csv", 8)
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--model", "default", "--data", str(train), "--eval-data", str(train),
                 "--quantize", "nf4", "--out", str(run), "--max-steps", "2", "--batch-size", "4",
                 "--max-length", "32", "--lr", "1e-2"]) == 0
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["merge", "--model", "default", "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
    printed = capsys.readouterr().out
    assert "trained on a nf4-quantised base" in printed and "full-precision base plus the update" in printed
    report = json.loads((merged / "lorakit_merge.json").read_text())
    assert report["trained_on_quantized_base"] == "nf4"
    assert report["max_logit_difference"] < 1e-4
    assert 0 < report["max_logit_difference_vs_quantized_base"] < 1.0


def test_gradient_svd_and_full_finetune_refuse_a_quantised_base():
    from lorakit.quantize import quantize_model
    from lorakit.train.config import TrainConfig

    model = quantize_model(tiny_llama(layers=1), "nf4")
    with pytest.raises(lorakit.ConfigError, match="quantised"):
        lorakit.adapt(model, lorakit.AdapterConfig(init="gradient-svd", target_modules=["q_proj"]),
                      gradient_loss=lambda m: m(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.sum())
    with pytest.raises(lorakit.ConfigError, match="quantised base"):
        TrainConfig(method="full", quantize="nf4")
