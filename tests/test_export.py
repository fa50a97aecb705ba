"""`lorakit export --to plain-lora`: every mergeable method as a plain PEFT LoRA, checked three ways.

Each case trains nothing: it moves every trainable tensor of a fresh adapter away from its
initial value (B and θ start at zero, so an untouched adapter would prove nothing), saves it,
exports it, and compares (1) the written factors with the method's formula (tests/reference.py),
(2) the outputs of the export loaded by lorakit and by HF PEFT with the original adapter's, and
(3) the difference the command measured and stored with what the test measures itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import reference
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.export import RankRule, plain_factors
from lorakit.export.plain_lora import plain_lora_config
from lorakit.merge_export import PROBE_TEXTS
from lorakit.rank.shrink import probe_batch
from lorakit.train.models import load_model, load_tokenizer

LLAMA = "random:llama,hidden=32,layers=2,heads=2,kv_heads=2,intermediate=64"  # q_proj, v_proj: 32 × 32
BERT = "random:bert,hidden=32,layers=2,heads=2,intermediate=64"
PREFIX = "base_model.model."


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def base(spec: str = LLAMA) -> torch.nn.Module:
    if spec == BERT:
        return load_model(BERT, "classify", num_labels=2, seed=0).eval()
    return load_model(spec, "causal-lm", seed=0).eval()


def moved_adapter(folder: Path, method: str, spec: str = LLAMA, **settings) -> Path:
    """An adapter of ``method`` whose every trainable tensor moved from its initial value, saved to ``folder``."""
    settings = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], **settings}
    model = lorakit.adapt(base(spec), lorakit.AdapterConfig(method=method, **settings))
    generator = torch.Generator().manual_seed(1)
    scale = 1.0 if method == "vera" else 0.1  # VeRA's vectors scale frozen random projections
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    lorakit.save_adapter(model, folder)
    return folder


def export(adapter: Path, out: Path, *flags: str, spec: str = LLAMA) -> dict:
    assert main(["export", "--adapter", str(adapter), "--to", "plain-lora", "--model", spec, "--out", str(out),
                 "--threads", "1", *flags]) == 0
    return json.loads((out / "lorakit_export.json").read_text())


def probe() -> dict[str, torch.Tensor]:
    return probe_batch(load_tokenizer(LLAMA), PROBE_TEXTS)  # the texts and tokens the command measures on


@torch.no_grad()
def logits(model: torch.nn.Module, spec: str = LLAMA) -> torch.Tensor:
    """Logits on the probe's real tokens (a classifier: its per-text logits)."""
    batch = probe_batch(load_tokenizer(spec), PROBE_TEXTS)
    out = model(**batch).logits.float()
    return out if out.dim() == 2 else out[batch["attention_mask"].bool()]


def lorakit_logits(folder: Path, spec: str = LLAMA) -> torch.Tensor:
    return logits(lorakit.load_adapter(base(spec), folder), spec)


def peft_logits(folder: Path, spec: str = LLAMA) -> torch.Tensor:
    return logits(peft.PeftModel.from_pretrained(base(spec), str(folder)).eval(), spec)


def written_update(out: Path, path: str) -> torch.Tensor:
    """B @ A of one module as the folder holds it: every module's scaling is 1 (checked in the first test)."""
    tensors = load_file(out / "adapter_model.safetensors")
    A, B = tensors[f"{PREFIX}{path}.lora_A.weight"].double(), tensors[f"{PREFIX}{path}.lora_B.weight"].double()
    return B @ A


def weight_of(path: str) -> torch.Tensor:
    return base().get_submodule(path).weight.detach().double()


def changes_output(folder: Path) -> None:
    model = lorakit.load_adapter(base(), folder)
    with model.base_only():
        plain = logits(model)
    assert (logits(model) - plain).abs().max() > 1e-2, "the adapter must change the output for the test to mean it"


# ---------------------------------------------------------------------------------------------
# exact: the update already is a plain LoRA
# ---------------------------------------------------------------------------------------------


def test_rslora_with_per_module_ranks_exports_the_same_update_with_its_scaling_folded_in(tmp_path, capsys):
    adapter = moved_adapter(tmp_path / "lora", "lora", use_rslora=True, rank_pattern={"v_proj": 2})
    changes_output(adapter)
    out = tmp_path / "plain"
    summary = export(adapter, out)
    printed = capsys.readouterr().out
    assert "exact" in printed and "--max-lora-rank 8" in printed

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["use_dora"] and config["use_rslora"] is False
    # scaling 1 everywhere, whoever reads it: PEFT's per-module alpha_pattern / rank_pattern, and an
    # engine that reads one lora_alpha / r for the whole adapter (vLLM)
    assert config["r"] == config["lora_alpha"] == 4
    assert config["alpha_pattern"] == config["rank_pattern"] and set(config["rank_pattern"].values()) == {2}
    original = load_file(adapter / "adapter_model.safetensors")
    paths = [k[len(PREFIX):-len(".lora_A.weight")] for k in original if k.endswith("lora_A.weight")]
    for path in paths:
        A, B = original[f"{PREFIX}{path}.lora_A.weight"].double(), original[f"{PREFIX}{path}.lora_B.weight"].double()
        s = 8 / A.shape[0] ** 0.5  # rsLoRA: alpha / √r
        assert torch.allclose(written_update(out, path), s * B @ A, atol=1e-6, rtol=0)
        assert summary["modules"][path]["rank"] == A.shape[0] and summary["modules"][path]["exact"]

    want = lorakit_logits(adapter)
    assert summary["exact"] and summary["max_logit_difference"] < 1e-5
    assert (lorakit_logits(out) - want).abs().max() < 1e-5
    assert (peft_logits(out) - want).abs().max() < 1e-5
    peft_model = peft.PeftModel.from_pretrained(base(), str(out))
    scalings = {m.scaling["default"] for m in peft_model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")}
    assert scalings == {1.0}
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        stored = json.loads(f.metadata()["lorakit"])["export"]
    assert stored == summary and stored["source"]["method"] == "lora"


def test_vera_folds_exactly_into_rank_r_factors(tmp_path):
    adapter = moved_adapter(tmp_path / "vera", "vera")
    changes_output(adapter)
    out = tmp_path / "plain"
    summary = export(adapter, out)
    assert summary["exact"] and summary["rank"] == {"min": 4, "max": 4}
    source = load_file(adapter / "adapter_model.safetensors")
    written = load_file(out / "adapter_model.safetensors")
    A_shared, B_shared = source["base_model.vera_A"], source["base_model.vera_B"]
    for path in summary["modules"]:
        d, b = source[f"{PREFIX}{path}.vera_lambda_d"], source[f"{PREFIX}{path}.vera_lambda_b"]
        out_features, in_features = weight_of(path).shape
        # A' = diag(d)·A_shared-slice, B' = diag(b)·B_shared-slice, to the last bit of float32
        assert torch.equal(written[f"{PREFIX}{path}.lora_A.weight"], d.unsqueeze(1) * A_shared[:, :in_features])
        assert torch.equal(written[f"{PREFIX}{path}.lora_B.weight"], b.unsqueeze(1) * B_shared[:out_features])
    want = lorakit_logits(adapter)
    assert (lorakit_logits(out) - want).abs().max() < 1e-6
    assert (peft_logits(out) - want).abs().max() < 1e-5


def test_vera_and_its_plain_lora_agree_in_float64():
    model = lorakit.adapt(base(), lorakit.AdapterConfig(method="vera", r=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator))
    model.double()
    modules = plain_factors(model, "default", RankRule())
    model.add_adapter("plain", plain_lora_config(model.configs["default"], {p: m.rank for p, m in modules.items()}),
                      activate=False)
    model.double()
    for path, method in model.adapter_modules("plain").items():
        method.take_combination(modules[path].A, modules[path].B, [])
    batch = probe()
    with torch.no_grad():
        want = model(**batch).logits
        model.set_active("plain")
        got = model(**batch).logits
    assert want.dtype == torch.float64
    assert (got - want).abs().max() < 1e-12


def test_delta_lora_in_memory_exports_its_moves_of_the_base_weight_too():
    """Delta-LoRA moved W itself while training; a serving engine loads the untouched base, so the
    export must carry that shift as well (exported_factors: rank 2r), exactly."""
    model = lorakit.adapt(base(), lorakit.AdapterConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    rule = lorakit.DeltaLoRA(model, "default", c=2.0, start_step=1)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
        rule.step()
    path = next(iter(model.adapter_modules("default")))
    assert (model.adapted_layers()[path].weight.double() - weight_of(path)).abs().max() > 1e-3
    modules = plain_factors(model, "default", RankRule())
    assert {m.rank for m in modules.values()} == {8} and all(m.exact for m in modules.values())
    fresh = lorakit.adapt(base(), plain_lora_config(model.configs["default"], {p: m.rank for p, m in modules.items()}))
    for p, method in fresh.adapter_modules("default").items():
        method.take_combination(modules[p].A, modules[p].B, [])
    assert (logits(fresh) - logits(model)).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# approximate: DoRA and GPart through the SVD of ΔW
# ---------------------------------------------------------------------------------------------


def reference_change(adapter: Path, path: str, method: str) -> torch.Tensor:
    """ΔW of one module from the paper's formula (tests/reference.py), in float64."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    W = weight_of(path)
    if method == "dora":
        A, B = tensors[f"{PREFIX}{path}.lora_A.weight"], tensors[f"{PREFIX}{path}.lora_B.weight"]
        m = tensors[f"{PREFIX}{path}.lora_magnitude_vector"]
        return reference.dora_weight(W, A, B, 8 / 4, m) - W
    options = lorakit.read_adapter(adapter).config.options
    return reference.gpart_weight(W, tensors[f"{PREFIX}{path}.gpart_theta"], options.scale, options.seed) - W


@pytest.mark.parametrize("method", ["dora", "gpart"])
def test_dora_and_gpart_are_exact_at_full_rank_and_report_what_a_low_rank_costs(tmp_path, method):
    adapter = moved_adapter(tmp_path / method, method)
    changes_output(adapter)
    want = lorakit_logits(adapter)

    full = export(adapter, tmp_path / "full", "--rank", "32")
    assert full["exact"] and full["max_logit_difference"] < 1e-4
    assert (peft_logits(tmp_path / "full") - want).abs().max() < 1e-4

    low = tmp_path / "low"
    summary = export(adapter, low, "--rank", "2")
    assert not summary["exact"] and summary["max_logit_difference"] > 1e-3
    for path, module in summary["modules"].items():
        change = reference_change(adapter, path, method)
        assert module["rank"] == 2
        assert torch.allclose(written_update(low, path), reference.rank_r_svd(change, 2), atol=1e-5, rtol=0)
        S = torch.linalg.svdvals(change)
        assert module["energy_kept"] == pytest.approx(float(S[:2].pow(2).sum() / S.pow(2).sum()), rel=1e-6)
    # the difference stored with the file is the one the written folder gives ...
    through_lorakit = lorakit_logits(low)
    assert (through_lorakit - want).abs().max().item() == pytest.approx(summary["max_logit_difference"], rel=1e-4)
    # ... and PEFT, loading it as a plain LoRA, computes what lorakit computes, well within that difference
    through_peft = peft_logits(low)
    assert (through_peft - through_lorakit).abs().max() < 1e-5
    assert (through_peft - want).abs().max() <= summary["max_logit_difference"] + 1e-5


def test_a_large_layer_takes_the_randomised_svd_and_still_finds_a_low_rank_change():
    """Above 1024 rows and columns ΔW's top directions come from a randomised SVD (exact energy):
    a DoRA whose magnitude equals ‖W + s·B A‖ changes W by exactly s·B A, rank 4, which it must find."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1030, 1100))
    model = lorakit.adapt(net, lorakit.AdapterConfig(method="dora", r=4, alpha=8, target_modules=["0"]))
    dora = model.adapter_modules("default")["0"]
    with torch.no_grad():
        dora.lora_B.copy_(torch.randn(dora.lora_B.shape, generator=torch.Generator().manual_seed(4)))
        dora.init_magnitude(model.adapted_layers()["0"].base_layer)
    change = 2.0 * dora.lora_B.double() @ dora.lora_A.double()
    exported = plain_factors(model, "default", RankRule(energy=0.999))["0"]
    assert exported.rank == 4 and exported.energy_kept == pytest.approx(1.0, abs=1e-6)
    assert not exported.exact  # a randomised spectrum is never called complete
    assert torch.allclose(exported.B @ exported.A, change, atol=1e-4 * float(change.abs().max()), rtol=0)


def test_energy_gives_each_module_the_fewest_directions_that_keep_it(tmp_path):
    adapter = moved_adapter(tmp_path / "gpart", "gpart", rank_pattern={"v_proj": 1})
    out = tmp_path / "plain"
    summary = export(adapter, out, "--energy", "0.9")
    assert summary["rule"] == {"chosen_by": "--energy", "rank": None, "max_rank": 64, "energy": 0.9}
    ranks = {}
    for path, module in summary["modules"].items():
        S = torch.linalg.svdvals(reference_change(adapter, path, "gpart"))
        share = S.pow(2).cumsum(0) / S.pow(2).sum()
        expected = int((share < 0.9).sum()) + 1
        assert module["rank"] == expected and module["energy_kept"] >= 0.9
        ranks[path] = expected
    assert len(set(ranks.values())) > 1, "θ of different lengths must need different ranks for the test to mean it"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == max(ranks.values()) and config["rank_pattern"]
    peft_model = peft.PeftModel.from_pretrained(base(), str(out)).eval()
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and name.endswith(("q_proj", "v_proj")):
            path = name.split("base_model.model.", 1)[1]
            assert module.lora_A["default"].weight.shape[0] == ranks[path]
    assert (logits(peft_model) - lorakit_logits(out)).abs().max() < 1e-5
    # the default for a method without exact factors is 99% of the energy, at most rank 64
    default = export(adapter, tmp_path / "default")
    assert default["rule"] == {"chosen_by": "default", "rank": None, "max_rank": 64, "energy": 0.99}
    assert default["energy_kept"]["min"] >= 0.99


def test_a_classifier_keeps_its_trained_head_and_peft_loads_it(tmp_path, capsys):
    adapter = moved_adapter(tmp_path / "dora", "dora", spec=BERT, target_modules=["query", "value"],
                            modules_to_save=["classifier"])
    out = tmp_path / "plain"
    summary = export(adapter, out, "--rank", "32", spec=BERT)
    assert "modules_to_save" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    want = lorakit_logits(adapter, BERT)
    assert summary["max_logit_difference"] < 1e-4
    assert (peft_logits(out, BERT) - want).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# refusals, run folders, atomic writes
# ---------------------------------------------------------------------------------------------


def test_cera_is_refused_with_its_reason_before_anything_is_written(tmp_path, capsys):
    adapter = moved_adapter(tmp_path / "cera", "cera")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", "--adapter", str(adapter), "--to", "plain-lora", "--model", LLAMA,
                 "--out", str(tmp_path / "plain")]) == 2
    assert "non-linear in x" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, not even a staging one
    assert main(["export", "--adapter", str(moved_adapter(tmp_path / "lora", "lora")), "--to", "plain-lora",
                 "--model", LLAMA, "--rank", "0"]) == 2
    assert "--rank must be at least 1" in capsys.readouterr().err


def test_a_run_folder_exports_beside_itself_and_a_second_export_replaces_the_first(tmp_path, capsys):
    run = tmp_path / "run"
    moved_adapter(run / "adapter", "dora")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": LLAMA, "seed": 0}))
    assert main(["export", "--adapter", str(run), "--to", "plain-lora", "--threads", "1"]) == 0  # base from the run
    out = tmp_path / "run-plain-lora"
    assert json.loads((out / "lorakit_export.json").read_text())["source"]["method"] == "dora"
    assert main(["export", "--adapter", str(run), "--to", "plain-lora", "--rank", "1", "--threads", "1"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-plain-lora"]  # nothing left beside them
    peft.PeftModel.from_pretrained(base(), str(out))  # the replaced folder is whole

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", "--adapter", str(run), "--to", "plain-lora", "--out", str(taken)]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
