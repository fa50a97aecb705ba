"""CeRA (method "cera"): h = W x + s · B (silu(A_g x̃) ⊙ (A x̃)), x̃ = dropout(x), lorakit's reading.

Held to float64 maths written out here on every layer kind, to an unchanged start, to gradients
on exactly its three tensors, to exact save → load under lorakit's own file type (refused by
PEFT, with the warning at save), to refusals of every merge and combine before anything changes
(``lorakit merge`` too), to mixed batches beside LoRA, and to training through ``lorakit train``.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from model_zoo import ToyNet, tiny_llama, toy_inputs
from safetensors.torch import load_file
from test_protocol import alone
from test_train import LLAMA, write_jsonl
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit.cli import main
from lorakit.combine import combine_adapters
from lorakit.methods import METHODS, CeRA

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to:UserWarning")

TENSORS = ("cera_gate_A", "cera_A", "cera_B")


def f64(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy without history; a float64 tensor passes through (the reference's own leaves keep theirs)."""
    return t if t.dtype == torch.float64 else t.detach().to(torch.float64)


def silu(z: torch.Tensor) -> torch.Tensor:
    return z / (1.0 + torch.exp(-z))


def randomise(am: lorakit.AdaptedModel, name: str = "default", seed: int = 0) -> None:
    """Random values in every CeRA tensor (B included), so the update shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for method in am.adapter_modules(name).values():
            for p in method.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)


def one_layer(module: nn.Module, **config) -> tuple[lorakit.AdaptedModel, CeRA]:
    holder = nn.Sequential()
    holder.add_module("layer", module)
    fields = {"method": "cera", "r": 3, "alpha": 5, "target_modules": ["layer"], **config}
    am = lorakit.adapt(holder, lorakit.AdapterConfig(**fields))
    randomise(am)
    return am, am.adapter_modules("default")["layer"]


def cera_update(x, Ag, A, B, s):
    """s · B (silu(A_g x) ⊙ (A x)) for rows x (…, in), in float64."""
    x, Ag, A, B = map(f64, (x, Ag, A, B))
    return s * (silu(x @ Ag.T) * (x @ A.T)) @ B.T


# -- the formula --------------------------------------------------------------------------------
def test_a_linear_layer_follows_the_formula_in_float64():
    torch.manual_seed(0)
    layer = nn.Linear(9, 7)
    am, m = one_layer(layer)
    x = torch.randn(2, 5, 9)
    expected = f64(x) @ f64(layer.weight).T + f64(layer.bias) + cera_update(x, m.cera_gate_A, m.cera_A, m.cera_B, 5 / 3)
    with torch.no_grad():
        assert_close(f64(am(x)), expected, atol=1e-5, rtol=1e-5)
    assert m.cera_gate_A.shape == m.cera_A.shape == (3, 9) and m.cera_B.shape == (7, 3)


def test_rslora_scales_by_alpha_over_root_rank():
    torch.manual_seed(0)
    layer = nn.Linear(9, 7, bias=False)
    am, m = one_layer(layer, r=4, alpha=6, use_rslora=True)
    x = torch.randn(3, 9)
    expected = f64(x) @ f64(layer.weight).T + cera_update(x, m.cera_gate_A, m.cera_A, m.cera_B, 6 / math.sqrt(4))
    assert m.scaling == pytest.approx(3.0)
    with torch.no_grad():
        assert_close(f64(am(x)), expected, atol=1e-5, rtol=1e-5)


def test_conv1d_embedding_and_conv2d_follow_the_formula_in_float64():
    torch.manual_seed(0)
    net = ToyNet().eval()
    am = lorakit.adapt(copy.deepcopy(net), lorakit.AdapterConfig(method="cera", r=3, alpha=5,
                                                                   target_modules=["c1d", "emb", "conv"]))
    randomise(am)
    mods = am.adapter_modules("default")
    s = 5 / 3
    ids, image = toy_inputs()
    h = torch.randn(4, 7, 10)
    with torch.no_grad():
        # Conv1D (GPT-2's): W stored (in, out)
        c = mods["c1d"]
        expected = f64(h) @ f64(net.c1d.weight) + f64(net.c1d.bias) + cera_update(h, c.cera_gate_A, c.cera_A,
                                                                                   c.cera_B, s)
        assert_close(f64(am.model.c1d(h)), expected, atol=1e-5, rtol=1e-5)
        # Embedding: A x is a lookup of column `id` of each projection
        e = mods["emb"]
        hidden = silu(f64(e.cera_gate_A).T[ids]) * f64(e.cera_A).T[ids]
        expected = f64(net.emb.weight)[ids] + s * hidden @ f64(e.cera_B).T
        assert_close(f64(am.model.emb(ids)), expected, atol=1e-5, rtol=1e-5)
        # Conv2d: both projections are r filters of the base kernel, B a 1x1 convolution; the gate is per channel
        k = mods["conv"]
        conv = net.conv

        def filters(P: torch.Tensor) -> torch.Tensor:
            return f64(P).reshape(3, *conv.weight.shape[1:])

        x = f64(image)
        gate = F.conv2d(x, filters(k.cera_gate_A), None, conv.stride, conv.padding)
        value = F.conv2d(x, filters(k.cera_A), None, conv.stride, conv.padding)
        update = s * torch.einsum("or,nrhw->nohw", f64(k.cera_B), silu(gate) * value)
        expected = F.conv2d(x, f64(conv.weight), f64(conv.bias), conv.stride, conv.padding) + update
        assert_close(f64(am.model.conv(image)), expected, atol=1e-5, rtol=1e-5)


def test_dropout_applies_one_mask_to_the_input_of_both_projections_and_none_in_eval():
    torch.manual_seed(0)
    layer = nn.Linear(9, 7)
    am, m = one_layer(layer, dropout=0.5)
    x = torch.randn(4, 9)
    am.train()
    torch.manual_seed(11)
    got = am(x)
    torch.manual_seed(11)
    kept = F.dropout(torch.ones_like(x), 0.5, training=True)  # the same draw: x̃ = x ⊙ kept
    base = f64(x) @ f64(layer.weight).T + f64(layer.bias)
    assert_close(f64(got), base + cera_update(x * kept, m.cera_gate_A, m.cera_A, m.cera_B, 5 / 3),
                 atol=1e-5, rtol=1e-5)
    am.eval()
    with torch.no_grad():
        assert_close(f64(am(x)), base + cera_update(x, m.cera_gate_A, m.cera_A, m.cera_B, 5 / 3),
                     atol=1e-5, rtol=1e-5)


# -- start, gradients, parameters ---------------------------------------------------------------
def ids(batch: int = 3, seed: int = 1, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def config(**changes) -> lorakit.AdapterConfig:
    return lorakit.AdapterConfig(**{"method": "cera", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                    **changes})


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_the_model_is_unchanged_at_init_and_only_b_starts_at_zero(init):
    base = tiny_llama()
    with torch.no_grad():
        before = base(input_ids=ids()).logits
    am = lorakit.adapt(copy.deepcopy(base), config(init=init))
    with torch.no_grad():
        assert torch.equal(am(input_ids=ids()).logits, before)
    for m in am.adapter_modules("default").values():
        assert torch.count_nonzero(m.cera_B) == 0
        assert m.cera_gate_A.abs().min() > 0 and m.cera_A.abs().min() > 0
        assert not torch.equal(m.cera_gate_A, m.cera_A)  # two independent draws
        if init == "default":  # Kaiming-uniform as LoRA's A: bound 1/√in
            assert m.cera_A.abs().max() <= 1 / math.sqrt(64)
        else:  # N(0, 1/r²)
            assert m.cera_A.std().item() == pytest.approx(1 / 4, rel=0.2)


def test_gradients_reach_exactly_its_three_tensors_and_equal_float64_autograd():
    torch.manual_seed(0)
    layer = nn.Linear(9, 7)
    am, m = one_layer(layer)
    x = torch.randn(5, 9)
    target = torch.randn(5, 7)
    (am(x) - target).square().sum().backward()
    got = {n for n, p in am.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {f"model.layer.adapters.default.{n}" for n in TENSORS}
    assert {n for n, p in am.named_parameters() if p.requires_grad} == got
    leaves = {n: f64(getattr(m, n)).requires_grad_(True) for n in TENSORS}
    out = f64(x) @ f64(layer.weight).T + f64(layer.bias) + cera_update(
        x, leaves["cera_gate_A"], leaves["cera_A"], leaves["cera_B"], 5 / 3)
    (out - f64(target)).square().sum().backward()
    for n in TENSORS:
        assert_close(f64(getattr(m, n).grad), leaves[n].grad, atol=1e-4, rtol=1e-4)


def test_at_init_the_first_gradient_reaches_b_alone():
    """B = 0 hides both projections from the loss until B moves, as LoRA's B hides A."""
    am = lorakit.adapt(tiny_llama(), config())
    x = ids()
    am(input_ids=x).logits.square().mean().backward()
    for m in am.adapter_modules("default").values():
        assert m.cera_B.grad.abs().sum() > 0
        assert m.cera_A.grad.abs().sum() == 0 and m.cera_gate_A.grad.abs().sum() == 0


def test_it_has_r_times_two_in_plus_out_parameters_per_layer():
    am = lorakit.adapt(tiny_llama(), config(r=5))
    # q_proj 64 → 64, v_proj 64 → 32 (2 of 4 heads), 2 layers
    assert sum(p.numel() for p in am.trainable_parameters()) == 2 * (5 * (2 * 64 + 64) + 5 * (2 * 64 + 32))


def test_what_it_cannot_take_is_refused_by_the_config():
    with pytest.raises(lorakit.ConfigError, match=r"CeRA \(method 'cera'\) does not support init 'pissa'; "
                                                  r"it supports 'default', 'gaussian'"):
        config(init="pissa")
    with pytest.raises(lorakit.ConfigError, match=r"CeRA \(method 'cera'\) has no option 'gate'; it has none"):
        config(options={"gate": 1})


def test_loraplus_trains_b_faster():
    am = lorakit.adapt(tiny_llama(), config())
    slow, fast = ({id(p) for p in g["params"]} for g in lorakit.loraplus_param_groups(am, lr=1e-3, ratio=16))
    for m in am.adapter_modules("default").values():
        assert id(m.cera_B) in fast and id(m.cera_A) in slow and id(m.cera_gate_A) in slow


# -- files --------------------------------------------------------------------------------------
def test_it_saves_as_lorakit_cera_loads_back_exactly_and_peft_refuses_it(tmp_path, caplog):
    base = tiny_llama()
    am = lorakit.adapt(copy.deepcopy(base), config(dropout=0.1, use_rslora=True, rank_pattern={"v_proj": 2}))
    randomise(am)
    am.eval()
    with torch.no_grad():
        expected = am(input_ids=ids()).logits
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        lorakit.save_adapter(am, tmp_path)
    assert "peft_type LORAKIT_CERA" in caplog.text and "PEFT's loader refuses" in caplog.text
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORAKIT_CERA"
    with (tmp_path / "adapter_model.safetensors").open("rb") as f:
        header = f.read(8 + int.from_bytes(f.read(8), "little"))
    for name in TENSORS:
        assert f"q_proj.{name}".encode() in header
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    back = loaded.configs["default"]
    assert (back.method, back.alpha, back.dropout, back.use_rslora) == ("cera", 8, 0.1, True)
    layer = "model.layers.1.self_attn."
    assert (back.rank_for(layer + "q_proj"), back.rank_for(layer + "v_proj")) == (4, 2)
    assert loaded.adapter_modules("default")["model.layers.0.self_attn.v_proj"].cera_B.shape == (32, 2)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids()).logits, expected)
    peft = pytest.importorskip("peft")
    with pytest.raises(KeyError, match="LORAKIT_CERA"):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


# -- refused: merge, combine ---------------------------------------------------------------------
def served() -> lorakit.AdaptedModel:
    """A Llama with a LoRA ("lora") and CeRA ("cera") on overlapping layers, both active."""
    am = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=4, target_modules=["q_proj", "o_proj"]), "lora")
    am.add_adapter("cera", config(), activate=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in am.adapter_modules("lora").values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    randomise(am, "cera", seed=2)
    return am.eval()


def test_every_merge_is_refused_before_any_layer_changes():
    am = served()
    before = {k: v.clone() for k, v in am.state_dict().items()}
    with torch.no_grad():
        out = am(input_ids=ids()).logits
    message = (r"adapter 'cera' \(cera\) cannot be merged: its update is non-linear in x \(a SiLU gate kept at "
               r"inference\), so no weight change equals it; serve it unmerged")
    for attempt in (am.merge, lambda: am.merge(["lora", "cera"]), am.merge_and_unload, lambda: am.unmerge(["cera"])):
        with pytest.raises(lorakit.ConfigError, match=message):
            attempt()
        assert all(layer.merged == [] for layer in am.adapted_layers().values())  # not even the LoRA listed first
        assert all(torch.equal(v, before[k]) for k, v in am.state_dict().items())
    with torch.no_grad():
        assert torch.equal(am(input_ids=ids()).logits, out)
    with pytest.raises(lorakit.ConfigError, match="cannot be merged: its update is non-linear in x"):
        am.adapter_modules("cera")["model.layers.0.self_attn.q_proj"].merged_weight(torch.zeros(64, 64))


def test_lorakit_merge_refuses_the_folder_before_reading_the_base(tmp_path, capsys):
    lorakit.save_adapter(lorakit.adapt(tiny_llama(layers=1), config()), tmp_path / "cera")
    code = main(["merge", "--model", str(tmp_path / "no-such-base"), "--adapter", str(tmp_path / "cera"),
                 "--out", str(tmp_path / "merged")])
    assert code == 2
    err = capsys.readouterr().err
    assert "(cera) cannot be merged: its update is non-linear in x" in err and "serve it unmerged" in err
    assert not (tmp_path / "merged").exists()


def test_combining_it_is_refused_before_anything_is_built():
    am = served()
    with pytest.raises(lorakit.ConfigError, match=r"adapter 'cera' \(cera\) cannot be combined"):
        combine_adapters(am, ["lora", "cera"], [1.0, 1.0], "both")
    assert "both" not in am.configs


# -- mixed batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [6, 1])  # a prefill, and a decoding step
def test_a_mixed_batch_of_cera_lora_and_base_rows_equals_each_row_alone(length):
    am = served()
    names = ["cera", "lora", "base", "cera", "lora", "cera"]
    x = ids(batch=len(names), seed=5, length=length)
    with torch.no_grad():
        mixed = am(input_ids=x, adapter_names=names).logits
        for row, name in enumerate(names):
            assert_close(mixed[row], alone(am, name, x[row:row + 1])[0], atol=1e-5, rtol=1e-5)
        assert (mixed[0] - alone(am, "base", x[:1])[0]).abs().max() > 1e-3  # CeRA's rows did change
    stacks = [layer.mix_state.stack for layer in am.adapted_layers().values() if layer.mix_state.stack is not None]
    assert stacks and all("cera" not in s.slot_of and "lora" in s.slot_of for s in stacks)


# -- training -----------------------------------------------------------------------------------
def test_lorakit_train_with_method_cera_lowers_the_loss(tmp_path):
    rows = [{"prompt": f"Q{i}: ", "completion": f"A{i % 3}"} for i in range(24)]
    data = write_jsonl(tmp_path / "lm.jsonl", rows)
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--out", str(out),
                 "--targets", "all-linear", "--method", "cera", "--rank", "4", "--lr", "1e-2", "--max-steps", "12",
                 "--batch-size", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "cera" and summary["steps"] == 12
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert summary["metric_after"] < 0.9 * summary["metric_before"]  # held-out perplexity
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORAKIT_CERA"
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    ups = [t for k, t in tensors.items() if k.endswith(".cera_B")]
    assert ups and all(t.abs().sum() > 0 for t in ups)  # every layer trained off zero
    assert METHODS["cera"] is CeRA
