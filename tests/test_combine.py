"""Combining adapters: each combination type against its formula on small matrices."""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit.combine import Combination, combine_adapters

OUT, IN = 5, 6


def model_with(configs: dict[str, lorakit.AdapterConfig], seed: int = 0) -> lorakit.AdaptedModel:
    torch.manual_seed(seed)
    am = None
    for name, config in configs.items():
        am = lorakit.adapt(am or nn.Sequential(nn.Linear(IN, OUT)), config, name)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in am.named_parameters():
            if ".adapters." in n:
                p.copy_(torch.randn(p.shape, generator=g) + (2.0 if "magnitude" in n else 0.0))
    return am


def delta(am: lorakit.AdaptedModel, name: str) -> torch.Tensor:
    m = am.adapter_modules(name)["0"]
    if isinstance(m, lorakit.methods.VeRA):
        A, B = m.factors()
        return ref.f64(B) @ ref.f64(A)
    return m.scaling * ref.f64(m.lora_B) @ ref.f64(m.lora_A)


def combined_delta(am, names, weights, kind, **kw) -> torch.Tensor:
    combine_adapters(am, names, weights, "out", Combination(kind, **kw))
    return delta(am, "out")


def two() -> lorakit.AdaptedModel:
    return model_with({"a": lorakit.AdapterConfig(r=2, alpha=3, target_modules=["0"]),
                       "b": lorakit.AdapterConfig(r=3, alpha=3, use_rslora=False, target_modules=["0"])})


def prune_top(d: torch.Tensor, density: float) -> torch.Tensor:
    k = round(density * d.numel())
    keep = torch.zeros(d.numel(), dtype=torch.bool)
    keep[d.abs().flatten().argsort(descending=True)[:k]] = True
    return d * keep.reshape(d.shape)


def ties_reference(ds: list[torch.Tensor]) -> torch.Tensor:
    total = sum(ds)
    out = torch.zeros_like(total)
    for idx in torch.cartesian_prod(torch.arange(OUT), torch.arange(IN)):
        i, j = idx.tolist()
        sign = torch.sign(total[i, j])
        agreeing = [d[i, j] for d in ds if d[i, j] != 0 and torch.sign(d[i, j]) == sign]
        out[i, j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, -2.0)])
def test_linear_is_the_exact_weighted_sum(weights):
    am = two()
    got = combined_delta(am, ["a", "b"], list(weights), "linear")
    assert_close(got, weights[0] * delta(am, "a") + weights[1] * delta(am, "b"), atol=1e-5, rtol=1e-5)
    assert am.adapter_modules("out")["0"].rank == 5  # concatenated, no truncation


def test_svd_truncates_the_exact_sum():
    am = two()
    exact = 0.5 * delta(am, "a") + 0.5 * delta(am, "b")
    full = combined_delta(copy.deepcopy(am), ["a", "b"], [0.5, 0.5], "svd", rank=5)
    assert_close(full, exact, atol=1e-5, rtol=1e-5)
    assert_close(combined_delta(am, ["a", "b"], [0.5, 0.5], "svd", rank=2), ref.rank_r_svd(exact, 2),
                 atol=1e-5, rtol=1e-5)


def test_magnitude_prune():
    am = two()
    da, db = 0.6 * delta(am, "a"), 0.4 * delta(am, "b")
    got = combined_delta(am, ["a", "b"], [0.6, 0.4], "magnitude_prune", density=0.4, rank=5)
    assert_close(got, prune_top(da, 0.4) + prune_top(db, 0.4), atol=1e-5, rtol=1e-5)


def test_ties_sign_election_and_disjoint_mean():
    am = two()
    da, db = 1.0 * delta(am, "a"), -0.5 * delta(am, "b")
    got = combined_delta(am, ["a", "b"], [1.0, -0.5], "ties", density=0.5, rank=5)
    assert_close(got, ties_reference([prune_top(da, 0.5), prune_top(db, 0.5)]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare(kind):
    am = two()
    da, db = 0.5 * delta(am, "a"), 0.5 * delta(am, "b")
    g = torch.Generator().manual_seed(3)
    dropped = [d * (torch.rand(d.shape, generator=g) < 0.3) / 0.3 for d in (da, db)]
    expected = sum(dropped) if kind == "dare_linear" else ties_reference(dropped)
    got = combined_delta(am, ["a", "b"], [0.5, 0.5], kind, density=0.3, rank=5, seed=3)
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dare_is_unbiased():
    am = two()
    exact = delta(am, "a")
    runs = []
    for seed in range(300):
        trial = copy.deepcopy(am)
        runs.append(combined_delta(trial, ["a"], [1.0], "dare_linear", density=0.5, rank=5, seed=seed))
    mean = torch.stack(runs).mean(0)
    assert (mean - exact).abs().max() < 0.25 * exact.abs().max()


@pytest.mark.parametrize("config", [
    lorakit.AdapterConfig(r=3, alpha=5, target_modules=["0"]),
    lorakit.AdapterConfig(r=4, alpha=2, use_rslora=True, target_modules=["0"]),
    lorakit.AdapterConfig(method="dora", r=2, alpha=4, target_modules=["0"]),
], ids=["lora", "rslora", "dora"])
def test_one_adapter_at_weight_one_comes_back_exactly(config):
    am = model_with({"a": config})
    combine_adapters(am, ["a"], [1.0], "out")
    a, out = am.adapter_modules("a")["0"], am.adapter_modules("out")["0"]
    assert am.configs["out"].r == config.r and am.configs["out"].alpha == pytest.approx(config.alpha)
    assert am.configs["out"].use_rslora == config.use_rslora and am.configs["out"].method == config.method
    assert_close(out.lora_A, a.lora_A, atol=0, rtol=0)
    assert_close(out.lora_B, a.lora_B, atol=1e-7, rtol=1e-6)
    if config.method == "dora":
        assert_close(out.lora_magnitude_vector, a.lora_magnitude_vector)


def test_vera_inputs_become_exact_lora():
    am = model_with({"v": lorakit.AdapterConfig(method="vera", r=4, target_modules=["0"]),
                     "l": lorakit.AdapterConfig(r=2, target_modules=["0"])})
    got = combined_delta(am, ["v", "l"], [1.0, 1.0], "linear")
    assert_close(got, delta(am, "v") + delta(am, "l"), atol=1e-5, rtol=1e-5)


def test_combined_adapter_ships_as_a_file(tmp_path):
    am = two()
    base = copy.deepcopy(am.model[0].base_layer)
    combine_adapters(am, ["a", "b"], [0.5, 0.5], "mix", Combination("ties", density=0.5))
    am.set_active("mix")
    x = torch.randn(4, IN)
    expected = am(x)
    lorakit.save_adapter(am, tmp_path, name="mix")
    loaded = lorakit.load_adapter(nn.Sequential(base), tmp_path)
    assert_close(loaded(x), expected, atol=1e-5, rtol=0)


def test_bad_requests():
    am = two()
    with pytest.raises(lorakit.ConfigError, match="one weight per adapter"):
        combine_adapters(am, ["a", "b"], [1.0], "x")
    with pytest.raises(lorakit.AdapterNotFoundError):
        combine_adapters(am, ["a", "zzz"], [1.0, 1.0], "x")
    with pytest.raises(lorakit.ConfigError, match="unknown combination"):
        Combination("average")
    dora = model_with({"d": lorakit.AdapterConfig(method="dora", target_modules=["0"])})
    with pytest.raises(lorakit.ConfigError, match="DoRA"):
        combine_adapters(dora, ["d"], [1.0], "x", Combination("svd"))


def test_combine_command_writes_a_loadable_adapter(tmp_path, capsys):
    from model_zoo import minilm

    from lorakit.cli import main

    folders = []
    for i, (method, r) in enumerate([("lora", 4), ("lora", 2)]):
        am = lorakit.adapt(minilm(), lorakit.AdapterConfig(method=method, r=r, target_modules=["query", "value"]))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for m in am.adapter_modules("default").values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.01)
        lorakit.save_adapter(am, tmp_path / f"a{i}")
        folders.append(str(tmp_path / f"a{i}"))
    out = tmp_path / "mix"
    assert main(["combine", "--model", "default", "--adapters", ",".join(folders), "--weights", "0.5,-1",
                 "--out", str(out)]) == 0
    assert "reproduces the combination to" in capsys.readouterr().out
    combined = lorakit.load_adapter(minilm(), out)
    parts = [lorakit.load_adapter(minilm(), f) for f in folders]
    path = "encoder.layer.0.attention.self.query"
    got = combined.adapter_modules("default")[path]
    want = sum(w * p.adapter_modules("default")[path].delta_weight() for w, p in zip((0.5, -1.0), parts, strict=True))
    assert_close(got.delta_weight(), want, atol=1e-6, rtol=1e-5)
