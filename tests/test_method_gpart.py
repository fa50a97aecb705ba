"""GPart (arXiv:2605.14841): ΔW = scale · reshape(P θ) with a fixed isometric partition matrix P.

The yardstick is written independently of lorakit (tests/reference.py): the partition rule in
plain Python integers (entries sorted by a 32-bit hash of their number and the seed, position p
joins group p mod d), P built as an explicit float64 matrix, and each layer kind's output from it.
"""

from __future__ import annotations

import copy
import json

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from model_zoo import ToyNet, tiny_llama, toy_inputs
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.cli import main
from lorakit.combine import combine_adapters
from lorakit.methods.gpart import GPartPartitions, partition


# -- helpers ---------------------------------------------------------------------------------------
def reference_delta(module, seed: int) -> torch.Tensor:
    """ΔW = scale · reshape(P θ), (out, in), float64."""
    W0 = torch.zeros(module.kind.out_features, module.kind.in_features)
    return ref.gpart_weight(W0, module.gpart_theta, module.scaling, seed)


def single(layer: nn.Module, **config) -> tuple[lorakit.AdaptedModel, object]:
    holder = nn.Sequential()
    holder.add_module("layer", layer)
    am = lorakit.adapt(holder, lorakit.AdapterConfig(method="gpart", target_modules=["layer"], **config))
    randomise(am)
    return am, am.adapter_modules("default")["layer"]


def randomise(am: lorakit.AdaptedModel, name: str = "default", seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in am.adapter_modules(name).values():
            for p in module.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


# -- the partition ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("out", "inp", "d", "seed"),
                         [(3, 4, 5, 7), (5, 7, 9, 0), (6, 6, 36, 3), (9, 12, 1, 2**32 - 1)])
def test_partition_is_the_reference_rule_and_balanced(out, inp, d, seed):
    groups = partition(out, inp, d, seed)
    assert groups.dtype == torch.int32 and groups.shape == (out * inp,)
    assert groups.tolist() == ref.gpart_groups(out, inp, d, seed)
    sizes = torch.bincount(groups.long(), minlength=d)
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1


def test_partition_is_pinned_so_saved_files_keep_their_map():
    """Files hold θ and the seed only: a changed rule would load every saved adapter wrongly."""
    assert partition(3, 4, 5, 7).tolist() == [0, 4, 0, 3, 1, 2, 0, 4, 1, 3, 2, 1]
    assert partition(2, 8, 3, 0).tolist() == [0, 0, 0, 1, 1, 2, 0, 1, 2, 0, 2, 1, 2, 2, 1, 0]
    assert partition(3, 4, 5, 8).tolist() != partition(3, 4, 5, 7).tolist()  # the seed matters


def test_the_partition_matrix_is_an_isometry_and_the_update_is_p_theta():
    torch.manual_seed(0)
    _, m = single(nn.Linear(7, 5), options={"d": 9, "seed": 3, "scale": 0.5})
    P = ref.gpart_matrix(5, 7, 9, 3)
    assert_close(P.T @ P, torch.eye(9, dtype=torch.float64), atol=1e-12, rtol=0)
    expected = 0.5 * (P @ f64(m.gpart_theta)).reshape(5, 7)
    assert_close(f64(m.delta_weight()), expected, atol=1e-6, rtol=0)
    assert m.delta_weight().norm().item() == pytest.approx(0.5 * m.gpart_theta.norm().item(), rel=1e-5)


LAYERS = {
    "linear": lambda: nn.Linear(7, 5),
    "conv1d": lambda: Conv1D(5, 7),  # transformers' (nf=out, nx=in): W stored (in, out)
    "embedding": lambda: nn.Embedding(9, 4),  # W = weight.T, (dim, vocab)
    "conv2d": lambda: nn.Conv2d(2, 3, 3, padding=1),  # W = weight (out, in·kh·kw)
}


def reference_output(name: str, layer: nn.Module, W_new: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if name == "linear":
        return f64(x) @ W_new.T + f64(layer.bias)
    if name == "conv1d":
        return f64(x) @ W_new.T + f64(layer.bias)
    if name == "embedding":
        return W_new.T[x]
    return F.conv2d(f64(x), W_new.reshape(layer.weight.shape), f64(layer.bias), padding=1)


def inputs_for(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if name == "embedding":
        return torch.randint(0, 9, (2, 6), generator=g)
    if name == "conv2d":
        return torch.randn(2, 2, 5, 5, generator=g)
    return torch.randn(2, 3, 7, generator=g)


@pytest.mark.parametrize("name", LAYERS)
def test_output_is_the_base_weight_plus_p_theta_on_every_layer_kind(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    am, m = single(layer, r=2, options={"seed": 11, "scale": 1.5})
    W = f64(m.kind.weight_matrix(layer))
    W_new = W + reference_delta(m, seed=11)
    x = inputs_for(name)
    assert_close(am(x).double(), reference_output(name, layer, W_new, x), atol=1e-5, rtol=0)


# -- sizes -----------------------------------------------------------------------------------------
def test_d_defaults_to_loras_parameters_per_layer_and_is_capped_at_the_layers_entries():
    model = nn.Sequential()
    model.add_module("a", nn.Linear(16, 8))
    model.add_module("b", nn.Linear(8, 16))
    model.add_module("tiny", nn.Linear(16, 2))  # 32 entries < r·(in + out)
    config = lorakit.AdapterConfig(method="gpart", r=4, target_modules=["a", "b", "tiny"], rank_pattern={"b": 2})
    modules = lorakit.adapt(copy.deepcopy(model), config).adapter_modules("default")
    assert {p: m.d for p, m in modules.items()} == {"a": 4 * 24, "b": 2 * 24, "tiny": 32}
    fixed = lorakit.adapt(copy.deepcopy(model), lorakit.AdapterConfig(
        method="gpart", options={"d": 40}, target_modules=["a", "b", "tiny"])).adapter_modules("default")
    assert {p: m.d for p, m in fixed.items()} == {"a": 40, "b": 40, "tiny": 32}
    assert {p: m.gpart_theta.numel() for p, m in fixed.items()} == {"a": 40, "b": 40, "tiny": 32}


def test_trainable_parameters_equal_loras_at_the_same_rank():
    base = tiny_llama()
    counts = {}
    for method in ("lora", "gpart"):
        am = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(method=method, r=4, target_modules="all-linear"))
        counts[method] = sum(p.numel() for p in am.trainable_parameters())
    assert counts["gpart"] == counts["lora"] > 0


def test_layers_of_one_shape_share_one_map_and_no_map_is_in_the_state_dict():
    am = lorakit.adapt(tiny_llama(layers=2), lorakit.AdapterConfig(method="gpart", r=2, target_modules=["q_proj"]))
    modules = list(am.adapter_modules("default").values())
    assert len(modules) == 2 and modules[0].partitions is modules[1].partitions is am.shared_state_of("default")
    assert isinstance(modules[0].partitions, GPartPartitions)
    assert modules[0].groups()[0].data_ptr() == modules[1].groups()[0].data_ptr()
    assert not [k for k in am.state_dict() if "groups" in k]


# -- behaviour -------------------------------------------------------------------------------------
def test_unchanged_at_init_and_the_gradient_reaches_exactly_theta_as_p_transposed_dl_dw():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    holder = nn.Sequential()
    holder.add_module("layer", layer)
    am = lorakit.adapt(copy.deepcopy(holder), lorakit.AdapterConfig(method="gpart", target_modules=["layer"],
                                                                    options={"d": 10, "seed": 4, "scale": 2.0}))
    m = am.adapter_modules("default")["layer"]
    assert torch.equal(m.gpart_theta, torch.zeros(10))
    x = torch.randn(3, 6)
    out = am(x)
    assert torch.equal(out, holder(x))
    target = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    (out - target).square().sum().backward()
    assert {n for n, p in am.named_parameters() if p.grad is not None} == {"model.layer.adapters.default.gpart_theta"}
    # ∂L/∂ΔW = Σ_rows (∂L/∂y)ᵀ x, and ∂L/∂θ = scale · Pᵀ vec(∂L/∂ΔW)
    dL_dW = (2 * (f64(out) - f64(target))).T @ f64(x)
    expected = 2.0 * ref.gpart_matrix(4, 6, 10, 4).T @ dL_dW.reshape(-1)
    assert expected.abs().min() > 0
    assert_close(f64(m.gpart_theta.grad), expected, atol=1e-5, rtol=1e-5)


def test_save_load_exact_and_the_file_holds_theta_and_the_seed_not_the_map(tmp_path):
    base = tiny_llama()
    config = lorakit.AdapterConfig(method="gpart", r=2, target_modules=["q_proj", "v_proj"],
                                   options={"seed": 123, "scale": 0.7})
    am = lorakit.adapt(copy.deepcopy(base), config)
    randomise(am)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = am(ids).logits
    lorakit.save_adapter(am, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    modules = am.adapter_modules("default")
    assert set(tensors) == {f"base_model.model.{p}.gpart_theta" for p in modules}
    assert all(tensors[f"base_model.model.{p}.gpart_theta"].shape == (m.d,) for p, m in modules.items())
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORAKIT_GPART"
    assert saved["options"] == {"d": None, "seed": 123, "scale": 0.7}
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    for path, m in loaded.adapter_modules("default").items():
        assert torch.equal(m.gpart_theta, modules[path].gpart_theta)
        assert torch.equal(m.groups()[0], modules[path].groups()[0])


def test_merge_writes_w_plus_delta_and_unmerge_restores_w():
    torch.manual_seed(0)
    am, m = single(nn.Linear(7, 5), options={"d": 8, "seed": 9})
    layer = am.model.layer.base_layer
    W0 = layer.weight.detach().clone()
    x = torch.randn(4, 7)
    with torch.no_grad():
        unmerged = am(x)
    am.merge()
    assert_close(f64(layer.weight), f64(W0) + reference_delta(m, seed=9), atol=1e-6, rtol=0)
    with torch.no_grad():
        assert_close(am(x), unmerged, atol=1e-5, rtol=0)
    am.unmerge()
    assert_close(layer.weight, W0, atol=1e-6, rtol=0)
    plain = am.merge_and_unload()
    assert isinstance(plain.layer, nn.Linear)
    assert_close(plain(x), unmerged, atol=1e-5, rtol=0)


def test_mixed_batch_rows_with_lora_and_base_equal_each_row_alone():
    am = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(method="gpart", r=2, target_modules=["q_proj", "v_proj"]))
    am.add_adapter("lora", lorakit.AdapterConfig(r=2, target_modules=["q_proj", "o_proj"]))
    randomise(am)
    with torch.no_grad():
        for p in am.adapter_modules("lora")["model.layers.0.self_attn.o_proj"].parameters():
            p.normal_(0, 0.3)
    names = ["default", "lora", "base", "default"]
    ids = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = am(ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "base":
                with am.base_only():
                    alone = am(ids[row:row + 1]).logits
            else:
                am.set_active(name)
                alone = am(ids[row:row + 1]).logits
            assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-5)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3 and (mixed[1] - mixed[2]).abs().max() > 1e-3


def test_combining_is_refused_with_the_reason_before_anything_is_added():
    am = lorakit.adapt(ToyNet(), lorakit.AdapterConfig(method="gpart", r=2, target_modules=["lin"]))
    am.add_adapter("other", lorakit.AdapterConfig(r=2, target_modules=["lin"]))
    with pytest.raises(lorakit.ConfigError, match=r"'default' \(gpart\) cannot be combined: .*low-rank factors"):
        combine_adapters(am, ["default", "other"], [1.0, 1.0], "both")
    assert set(am.configs) == {"default", "other"}
    am(*toy_inputs())


@pytest.mark.parametrize(("options", "message"), [
    ({"d": 0}, "d must be a positive integer"),
    ({"d": 2.5}, "d must be a positive integer"),
    ({"seed": -1}, "seed must be an integer from 0"),
    ({"seed": 2**32}, "seed must be an integer from 0"),
    ({"scale": 0}, "scale must be a finite non-zero number"),
    ({"scale": float("nan")}, "scale must be a finite non-zero number"),
    ({"rank": 4}, "has no option 'rank'; its options are d, seed, scale"),
])
def test_bad_options_are_refused_naming_what_to_give(options, message):
    with pytest.raises(lorakit.ConfigError, match=message):
        lorakit.AdapterConfig(method="gpart", options=options)


def test_lorakit_train_with_method_options_lowers_the_loss(tmp_path):
    rows = [{"prompt": f"Q{i}: ", "completion": f"A{i % 3}"} for i in range(24)]
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    model = "random:llama,hidden=32,layers=1,heads=2,kv_heads=2,intermediate=64"
    assert main(["train", "--quiet", "--task", "causal-lm", "--model", model, "--data", str(data), "--out", str(out),
                 "--max-steps", "12", "--batch-size", "4", "--targets", "all-linear", "--lr", "1e-2",
                 "--general-samples", "0", "--method", "gpart", "--method-options", "d=300,seed=5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "gpart" and summary["trainable_params"] == 7 * 300
    assert summary["metric_after"] < 0.9 * summary["metric_before"]  # perplexity on the eval split
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["options"] == {"d": 300, "seed": 5, "scale": 1.0}


@pytest.mark.parametrize("other_seed", [123, 321])  # the same map (values copied in place), or another one
def test_a_hot_swap_serves_what_a_fresh_load_of_the_new_file_serves(tmp_path, other_seed):
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    folders = {}
    for seed, values in ((123, 1), (other_seed, 2)):
        am = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(
            method="gpart", r=2, target_modules=["q_proj", "v_proj"], options={"seed": seed}))
        randomise(am, seed=values)
        folders[values] = tmp_path / str(values)
        lorakit.save_adapter(am, folders[values])
    served = lorakit.load_adapter(copy.deepcopy(base), folders[1])
    served.replace_adapter("default", folders[2])
    fresh = lorakit.load_adapter(copy.deepcopy(base), folders[2])
    with torch.no_grad():
        assert torch.equal(served(ids).logits, fresh(ids).logits)
