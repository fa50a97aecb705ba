"""`lorakit rank`: gradient spectra and a budgeted rank suggestion before training, trained-update
spectra and exact shrinking after, on tiny random models and synthetic gradients of known rank."""

from __future__ import annotations

import json
import random
from pathlib import Path

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.cli import main
from lorakit.inits import base_weight_gradients
from lorakit.methods import register_method, unregister_method
from lorakit.rank import allocate, captured_share, factor_spectrum, matrix_spectrum, suggested_settings
from lorakit.rank.spectra import Spectrum, truncated_factors
from lorakit.train.config import TrainConfig
from lorakit.train.models import load_model

BERT = "random:bert,hidden=32,layers=2,heads=2,intermediate=64"
LLAMA = "random:llama,hidden=32,layers=2,heads=2,kv_heads=2,intermediate=64"


# ---------------------------------------------------------------------------------------------
# synthetic gradients of known rank
# ---------------------------------------------------------------------------------------------


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


class ThreeHeads(nn.Module):
    """Three linear maps of the same input, each fitted to its own regression target."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 10, bias=False)
        self.b = nn.Linear(12, 30, bias=False)
        self.c = nn.Linear(12, 8, bias=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": self.a(x), "b": self.b(x), "c": self.c(x)}


def known_rank_problem(k_a: int, k_b: int):
    """ThreeHeads, whose loss gradient wrt ``a.weight`` is exactly −M_a (rank ``k_a``, singular values
    all 1), wrt ``b.weight`` exactly −M_b (rank ``k_b``, singular values 3), and wrt ``c.weight`` zero.

    The targets are each layer's own output plus a rank-k map of the input, y = W x + M x, and the
    inputs are whitened (XᵀX = n I), so dL/dW of ½ mean ‖W x − y‖² is −M XᵀX / n = −M.
    """
    torch.manual_seed(0)
    model = ThreeHeads()
    n = 48
    X = (orthonormal(n, 12, seed=1) * n**0.5).float()  # XᵀX = n I
    M_a = (orthonormal(10, k_a, 2) @ orthonormal(12, k_a, 3).t()).float()
    M_b = (3 * orthonormal(30, k_b, 4) @ orthonormal(12, k_b, 5).t()).float()
    with torch.no_grad():
        targets = {"a": model.a(X) + X @ M_a.t(), "b": model.b(X) + X @ M_b.t(), "c": model.c(X)}

    def loss_fn(m: nn.Module) -> torch.Tensor:
        out = m(X)
        return sum(0.5 * (out[key] - targets[key]).pow(2).sum() / n for key in out)

    return model, loss_fn


def test_a_gradient_of_known_rank_gives_that_rank_and_the_suggestion_finds_it():
    model, loss_fn = known_rank_problem(k_a=3, k_b=5)
    adapted = lorakit.adapt(model, lorakit.AdapterConfig(r=1, target_modules=["a", "b", "c"]))
    # the gradient `--init gradient-svd` starts from, as `lorakit rank` collects it
    gradients = base_weight_gradients(adapted, adapted.adapted_layers(), loss_fn)
    spectra = {p: matrix_spectrum(g, keep=64) for p, g in gradients.items()}
    for path, k, sigma in (("a", 3, 1.0), ("b", 5, 3.0)):
        s = spectra[path]
        assert [s.effective_rank(share) for share in (0.9, 0.95, 0.99)] == [k, k, k]
        assert s.stable_rank == pytest.approx(k, rel=1e-5)
        assert s.numerical_rank == k
        assert s.values[:k] == pytest.approx([sigma] * k, rel=1e-5)
    assert spectra["c"].energy == 0 and spectra["c"].effective_rank(0.99) == 0
    # a budget large enough for everything: each module gets exactly the rank its gradient has, c nothing
    ranks = allocate(spectra, budget=10**6, max_rank=64)
    assert ranks == {"a": 3, "b": 5, "c": 0}
    assert captured_share(spectra, ranks) == pytest.approx(1.0)
    settings = suggested_settings(ranks, ["", "a", "b", "c"], {"model": "m"})
    assert settings["targets"] == "a,b" and settings["rank"] in (3, 5)
    assert {**{p: settings["rank"] for p in ("a", "b")}, **settings["rank_pattern"]} == {"a": 3, "b": 5}
    assert all(settings["alpha_pattern"][p] == 2 * r for p, r in settings["rank_pattern"].items())


def test_effective_and_stable_rank_follow_their_definitions():
    s = Spectrum((4.0, 2.0, 1.0, 0.5), energy=21.25, out_features=4, in_features=4)
    # energies 16, 4, 1, 0.25 of 21.25: 75.3%, 94.1%, 98.8%, 100%
    assert (s.effective_rank(0.5), s.effective_rank(0.9), s.effective_rank(0.95), s.effective_rank(0.99)) == \
        (1, 2, 3, 4)
    assert s.stable_rank == pytest.approx(21.25 / 16)
    # a truncated spectrum (randomised SVD of a large matrix) says "more than it holds" instead of guessing
    top = Spectrum((4.0, 2.0), energy=21.25, out_features=4000, in_features=4000, complete=False)
    assert top.effective_rank(0.9) == 2 and top.effective_rank(0.99) is None


def test_the_greedy_allocation_buys_energy_per_parameter_within_the_budget():
    # a: 10 parameters a unit, σ² 9, 4, 1; b: 40 a unit, σ² 100, 64
    a = Spectrum((3.0, 2.0, 1.0), 14.0, out_features=5, in_features=5)
    b = Spectrum((10.0, 8.0), 164.0, out_features=20, in_features=20)
    spectra = {"a": a, "b": b}
    # per parameter: b₁ 2.5, b₂ 1.6, a₁ 0.9, a₂ 0.4, a₃ 0.1
    assert allocate(spectra, budget=40, max_rank=8) == {"a": 0, "b": 1}
    assert allocate(spectra, budget=89, max_rank=8) == {"a": 0, "b": 2}
    assert allocate(spectra, budget=95, max_rank=8) == {"a": 1, "b": 2}
    assert allocate(spectra, budget=39, max_rank=8) == {"a": 3, "b": 0}  # b never fits: a takes what it can
    assert allocate(spectra, budget=10**4, max_rank=1) == {"a": 1, "b": 1}
    for budget in range(1, 130, 7):
        ranks = allocate(spectra, budget, max_rank=8)
        assert ranks["a"] * 10 + ranks["b"] * 40 <= budget


# ---------------------------------------------------------------------------------------------
# before training, end to end: suggestion → `lorakit train --config`
# ---------------------------------------------------------------------------------------------


def write_classification(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(n):
        label = rng.choice(["good", "bad"])
        filler = " ".join(rng.choice(["a", "b", "c", "d"]) for _ in range(rng.randint(2, 8)))
        lines.append(f"{filler} {label} {filler},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_suggestion_respects_the_budget_and_trains_through_train_config(tmp_path, capsys):
    data = write_classification(tmp_path / "train.csv")
    out = tmp_path / "rank"
    budget = 2000
    assert main(["rank", "--model", BERT, "--data", str(data), "--budget-params", str(budget), "--batches", "2",
                 "--batch-size", "8", "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "bert.pooler.dense" in printed and "suggested:" in printed
    for name in ("rank.json", "suggested.yaml", "spectra.png", "effective_rank.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "rank.json").read_text())
    assert report["examples"] == 16 and report["budget_params"] == budget
    modules = report["modules"]
    assert len(modules) == 13  # all-linear: 6 per layer and the pooler, not the classifier head
    ranks = report["suggestion"]["ranks"]
    spent = sum(r * (modules[p]["in_features"] + modules[p]["out_features"]) for p, r in ranks.items())
    assert spent == report["suggestion"]["params"] <= budget
    assert spent > budget - 96  # within one unit (the largest module's in + out) of the budget
    assert len(set(ranks.values())) > 1, "the case must exercise rank_pattern"
    for path, figures in modules.items():
        values = figures["singular_values"]
        assert values == sorted(values, reverse=True) and figures["share"] >= 0
        effective = figures["effective_rank"]
        assert effective["0.9"] <= effective["0.95"] <= effective["0.99"]
        assert figures["suggested_rank"] == ranks.get(path, 0)
    assert sum(f["share"] for f in modules.values()) == pytest.approx(1.0)

    suggested = yaml.safe_load((out / "suggested.yaml").read_text())
    assert suggested["model"] == BERT and suggested["rank_pattern"]
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--config", str(out / "suggested.yaml"), "--out", str(run), "--max-steps", "2",
                 "--batch-size", "8", "--general-samples", "0", "--threads", "1"]) == 0
    saved = lorakit.read_adapter(run)
    written = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert written["rank_pattern"], "the per-module ranks reached the saved adapter_config.json"
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    adapted = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
               for k in tensors if k.endswith("lora_A.weight")}
    assert adapted == set(ranks)
    for path, rank in ranks.items():
        assert saved.config.rank_for(path) == rank
        assert tensors[f"base_model.model.{path}.lora_A.weight"].shape[0] == rank


# ---------------------------------------------------------------------------------------------
# after training: spectra of ΔW = s·B·A, and shrinking
# ---------------------------------------------------------------------------------------------


def llama_base() -> nn.Module:
    return load_model(LLAMA, "causal-lm", seed=0).eval()


def saved_adapter(folder: Path, true_ranks: dict[str, int], r: int = 8, method: str = "lora") -> Path:
    """An adapter of rank ``r`` on q_proj and v_proj whose update on each module has rank
    ``true_ranks[leaf]``: B = B₀ C with B₀ (out, k)."""
    model = lorakit.adapt(llama_base(), lorakit.AdapterConfig(method=method, r=r, alpha=16,
                                                              target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path, m in model.adapter_modules("default").items():
            k = true_ranks[path.split(".")[-1]]
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=generator))
            B0 = torch.randn(m.lora_B.shape[0], k, generator=generator)
            m.lora_B.copy_(0.1 * B0 @ torch.randn(k, r, generator=generator))
    lorakit.save_adapter(model, folder)
    return folder


def probe() -> torch.Tensor:
    return torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=probe()).logits.float()


def test_trained_figures_equal_an_explicit_svd_of_the_dense_update(tmp_path):
    folder = saved_adapter(tmp_path / "adapter", {"q_proj": 3, "v_proj": 8})
    out = tmp_path / "report"
    assert main(["rank", "--adapter", str(folder), "--model", LLAMA, "--out", str(out), "--threads", "1"]) == 0
    report = json.loads((out / "rank.json").read_text())
    assert report["mode"] == "adapter" and (out / "spectra.png").is_file() and (out / "effective_rank.png").is_file()
    tensors = load_file(folder / "adapter_model.safetensors")
    assert len(report["modules"]) == 4
    for path, figures in report["modules"].items():
        A = tensors[f"base_model.model.{path}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{path}.lora_B.weight"].double()
        dense = (16 / 8) * B @ A  # s = alpha / r
        S = torch.linalg.svdvals(dense)
        energy = S.pow(2)
        cumulative = energy.cumsum(0) / energy.sum()
        expected = {f"{p:g}": int((cumulative < p - 1e-12).sum()) + 1 for p in (0.9, 0.95, 0.99)}
        assert figures["singular_values"] == pytest.approx(S[:8].tolist(), rel=1e-5)
        assert figures["effective_rank"] == expected
        assert figures["stable_rank"] == pytest.approx(float(energy.sum() / energy[0]), rel=1e-4)
        assert figures["rank"] == 8
        assert figures["rank_used"] == pytest.approx(expected["0.99"] / 8)
        true_rank = 3 if path.endswith("q_proj") else 8
        assert int((S / S[0] > 1e-5).sum()) == true_rank  # float32 factors: rounding at ~1e-7
    # and in the library, exactly: the r×r core gives the dense update's spectrum and its best rank-k part
    A, B = torch.randn(6, 40, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float64)
    dense = B @ A
    full = torch.linalg.svdvals(dense)
    assert list(factor_spectrum(A, B).values) == pytest.approx(full[:6].tolist(), rel=1e-10)
    assert float(full[6:].max()) < 1e-10 * float(full[0])  # the rest of the dense spectrum is zero
    U, S, Vh = torch.linalg.svd(dense)
    A2, B2 = truncated_factors(A, B, 2)
    assert torch.allclose(B2 @ A2, U[:, :2] * S[:2] @ Vh[:2], atol=1e-10)


@pytest.mark.parametrize("flags", [["--shrink-rank", "3"], ["--shrink", "0.99999"]])
def test_shrinking_to_the_true_rank_is_exact_and_peft_loads_it(tmp_path, flags, capsys):
    folder = saved_adapter(tmp_path / "adapter", {"q_proj": 2, "v_proj": 3})
    small = tmp_path / "small"
    assert main(["rank", "--adapter", str(folder), "--model", LLAMA, *flags, "--out", str(small),
                 "--threads", "1"]) == 0
    assert "bytes" in capsys.readouterr().out
    report = json.loads((small / "rank.json").read_text())["shrink"]
    expected = {"q_proj": 2, "v_proj": 3} if flags[0] == "--shrink" else {"q_proj": 3, "v_proj": 3}
    assert {p: expected[p.split(".")[-1]] for p in report["ranks"]} == report["ranks"]
    assert report["max_logit_difference"] < 1e-5
    assert report["bytes_after"] < report["bytes_before"]
    original = lorakit.load_adapter(llama_base(), folder)
    base_logits, want = None, logits(original)
    with original.base_only():
        base_logits = logits(original)
    assert (want - base_logits).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    # lorakit loads the smaller adapter back with the same logits ...
    assert (logits(lorakit.load_adapter(llama_base(), small)) - want).abs().max() < 1e-5
    # ... and so does PEFT, per-module ranks (rank_pattern) included
    written = json.loads((small / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA"
    if flags[0] == "--shrink":
        assert written["r"] in (2, 3) and written["rank_pattern"]
    peft_model = peft.PeftModel.from_pretrained(llama_base(), str(small)).eval()
    assert (logits(peft_model) - want).abs().max() < 1e-5
    for name, module in peft_model.named_modules():
        if name.endswith(("q_proj", "v_proj")) and hasattr(module, "lora_A"):
            assert module.lora_A["default"].weight.shape[0] == expected[name.split(".")[-1]]


def test_shrinking_below_the_true_rank_reports_the_difference_it_causes(tmp_path):
    folder = saved_adapter(tmp_path / "adapter", {"q_proj": 4, "v_proj": 4})
    small = tmp_path / "small"
    assert main(["rank", "--adapter", str(folder), "--model", LLAMA, "--shrink-rank", "1", "--out", str(small),
                 "--threads", "1"]) == 0
    report = json.loads((small / "rank.json").read_text())["shrink"]
    assert set(report["ranks"].values()) == {1}
    got = logits(lorakit.load_adapter(llama_base(), small))
    want = logits(lorakit.load_adapter(llama_base(), folder))
    assert report["max_logit_difference"] > 1e-3
    assert (got - want).abs().max() > 1e-3


def test_shrink_ranks_follow_the_threshold_and_never_exceed_the_update():
    from lorakit.rank.shrink import shrink_ranks
    from lorakit.rank.trained import TrainedModule

    def module(values: tuple[float, ...]) -> TrainedModule:
        spectrum = Spectrum(values, sum(v * v for v in values), out_features=16, in_features=16)
        return TrainedModule(spectrum, rank=len(values), factor_rank=len(values), scaling=2.0)

    modules = {"a": module((4.0, 2.0, 1.0, 0.5)), "b": module((1.0, 0.0)), "zero": module((0.0, 0.0, 0.0))}
    assert shrink_ranks(modules, 0.9, None) == {"a": 2, "b": 1, "zero": 1}
    assert shrink_ranks(modules, 0.99, None) == {"a": 4, "b": 1, "zero": 1}
    assert shrink_ranks(modules, None, 3) == {"a": 3, "b": 2, "zero": 3}


# ---------------------------------------------------------------------------------------------
# clear errors
# ---------------------------------------------------------------------------------------------


def test_neither_model_nor_adapter_is_a_clear_error(tmp_path, capsys):
    assert main(["rank", "--out", str(tmp_path / "x")]) == 2
    message = capsys.readouterr().err
    assert "--model" in message and "--adapter" in message


def test_shrink_without_an_adapter_and_data_with_one_are_errors(tmp_path, capsys):
    assert main(["rank", "--model", BERT, "--shrink", "0.9", "--out", str(tmp_path / "x")]) == 2
    assert "--adapter" in capsys.readouterr().err
    folder = saved_adapter(tmp_path / "adapter", {"q_proj": 2, "v_proj": 2})
    assert main(["rank", "--adapter", str(folder), "--data", "default", "--out", str(tmp_path / "y")]) == 2
    assert "drop --data" in capsys.readouterr().err
    assert main(["rank", "--adapter", str(folder), "--model", LLAMA, "--shrink", "1.5",
                 "--out", str(tmp_path / "z")]) == 2
    assert "(0, 1]" in capsys.readouterr().err


def test_an_adapter_whose_update_is_not_b_times_a_is_refused(tmp_path, capsys):
    from test_protocol import SiluGate

    register_method(SiluGate)
    try:
        model = lorakit.adapt(llama_base(), lorakit.AdapterConfig(method=SiluGate.method_name, r=2,
                                                                  target_modules=["q_proj"]))
        lorakit.save_adapter(model, tmp_path / "gate")
        assert main(["rank", "--adapter", str(tmp_path / "gate"), "--model", LLAMA, "--out", str(tmp_path / "x")]) == 2
        message = capsys.readouterr().err
        assert "no update of the form ΔW = B·A" in message and "lora" in message
    finally:
        unregister_method(SiluGate.method_name)
    assert not (tmp_path / "x" / "rank.json").exists()


def test_shrinking_a_dora_adapter_is_refused_but_its_spectra_are_reported(tmp_path, capsys):
    model = lorakit.adapt(llama_base(), lorakit.AdapterConfig(method="dora", r=4, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "dora")
    assert main(["rank", "--adapter", str(tmp_path / "dora"), "--model", LLAMA, "--shrink-rank", "2",
                 "--out", str(tmp_path / "small")]) == 2
    assert "W + B·A" in capsys.readouterr().err
    assert main(["rank", "--adapter", str(tmp_path / "dora"), "--model", LLAMA, "--out", str(tmp_path / "r")]) == 0


# ---------------------------------------------------------------------------------------------
# `lorakit train`: the adapter options Python had and the train config lacked
# ---------------------------------------------------------------------------------------------


def write_lm(path: Path) -> Path:
    rows = [{"prompt": f"Q{i}: ", "completion": f"A{i % 3}"} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_flags_for_exclusions_layers_and_per_module_ranks_reach_the_adapter(tmp_path):
    data = write_lm(tmp_path / "lm.jsonl")
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--model", LLAMA, "--task", "causal-lm", "--data", str(data), "--out", str(run),
                 "--targets", "q_proj,v_proj,o_proj", "--exclude-modules", "o_proj", "--layers-to-transform", "1",
                 "--rank-pattern", "v_proj=2", "--alpha-pattern", "v_proj=6", "--rank", "4", "--alpha", "8",
                 "--max-steps", "1", "--batch-size", "4", "--general-samples", "0", "--threads", "1"]) == 0
    config = lorakit.read_adapter(run).config
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    paths = sorted(k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                   for k in tensors if k.endswith("lora_A.weight"))
    assert paths == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert config.rank_for(paths[0]) == 4 and config.rank_for(paths[1]) == 2
    assert config.scaling_for(paths[0]) == 2.0 and config.scaling_for(paths[1]) == 3.0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["rank_pattern"] == "v_proj=2" and saved["layers_to_transform"] == "1"


def test_train_config_reads_the_new_options_from_yaml_and_refuses_bad_ones():
    config = TrainConfig(exclude_modules=["o_proj"], layers_to_transform=[0, 2], layers_pattern="layers",
                         rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 8})
    assert config.excluded_modules() == ("o_proj",) and config.layer_indices() == (0, 2)
    assert config.rank_patterns() == {"q_proj": 4} and config.alpha_patterns() == {"q_proj": 8.0}
    assert TrainConfig(exclude_modules=".*\\.o_proj").excluded_modules() == ".*\\.o_proj"
    assert TrainConfig(layers_to_transform=3).layer_indices() == (3,)
    with pytest.raises(lorakit.ConfigError, match="--rank-pattern"):
        TrainConfig(rank_pattern="q_proj=four")
    with pytest.raises(lorakit.ConfigError, match="key=value"):
        TrainConfig(alpha_pattern="q_proj")
    with pytest.raises(lorakit.ConfigError, match="--layers-to-transform"):
        TrainConfig(layers_to_transform="first")
