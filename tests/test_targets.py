"""Where adapters go: names, suffixes, regexes, all-linear, layer indices, exclusions, errors."""

from __future__ import annotations

import pytest
import torch
from model_zoo import minilm, tiny_llama
from torch import nn

import lorakit
from lorakit.targets import matches_rules, resolve_targets


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return tiny_llama(layers=3)


def targets(model, **config) -> list[str]:
    return resolve_targets(model, lorakit.AdapterConfig(**config))


def test_suffix_and_exact_names(llama):
    got = targets(llama, target_modules=["q_proj", "model.layers.0.mlp.up_proj"])
    assert set(got) == {f"model.layers.{i}.self_attn.q_proj" for i in range(3)} | {"model.layers.0.mlp.up_proj"}
    assert got.index("model.layers.0.mlp.up_proj") < got.index("model.layers.1.self_attn.q_proj")  # model order
    # A suffix matches whole path components only: "proj" is not a suffix of "q_proj".
    with pytest.raises(lorakit.TargetNotFoundError):
        targets(llama, target_modules=["proj"])


def test_rules_match_whole_dotted_suffixes():
    rules = ("self_attn.q_proj", "lm_head")
    assert matches_rules("model.layers.0.self_attn.q_proj", rules) and matches_rules("lm_head", rules)
    assert not matches_rules("model.layers.0.xself_attn.q_proj", rules)
    assert not matches_rules("model.layers.0.self_attn.q_proj.base_layer", rules)
    assert not matches_rules("attn.q_proj", rules) and not matches_rules("", rules)
    assert matches_rules("a.b", ["b"]) and not matches_rules("a.b", [])  # lists work too
    assert matches_rules("a.b", r"a\..") and not matches_rules("xa.b", r"a\..")


def test_regex_is_a_full_match(llama):
    got = targets(llama, target_modules=r".*\.(q|k)_proj")
    assert len(got) == 6 and all(p.endswith(("q_proj", "k_proj")) for p in got)
    with pytest.raises(lorakit.TargetNotFoundError):
        targets(llama, target_modules=r"q_proj")  # full match needed, no implicit suffix for regexes


def test_all_linear_skips_heads():
    llama = tiny_llama(layers=2)
    got = targets(llama, target_modules="all-linear")
    assert "lm_head" not in got and len(got) == 2 * 7
    bert = minilm(num_labels=2)
    got = targets(bert, target_modules="all-linear")
    assert "classifier" not in got
    assert "bert.pooler.dense" in got and "bert.encoder.layer.5.output.dense" in got
    assert all(isinstance(bert.get_submodule(p), nn.Linear) for p in got)


def test_layers_to_transform_and_exclude(llama):
    got = targets(llama, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2])
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                   "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    got = targets(llama, target_modules="all-linear", exclude_modules=["mlp.down_proj", "o_proj"])
    assert not any(p.endswith(("down_proj", "o_proj")) for p in got) and len(got) == 3 * 5
    got = targets(llama, target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers")
    assert got == ["model.layers.1.self_attn.q_proj"]


def test_rank_and_alpha_patterns(llama):
    config = lorakit.AdapterConfig(target_modules=["q_proj", "v_proj"], r=4, alpha=8,
                                   rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 1})
    am = lorakit.adapt(llama, config)
    mods = am.adapter_modules("default")
    assert mods["model.layers.0.self_attn.v_proj"].rank == 2
    assert mods["model.layers.0.self_attn.q_proj"].rank == 4
    assert mods["model.layers.0.self_attn.q_proj"].scaling == 2.0
    assert mods["model.layers.1.self_attn.q_proj"].scaling == 0.25
    assert mods["model.layers.0.self_attn.v_proj"].scaling == 4.0


def test_misspelled_target_lists_near_misses_and_kinds(llama):
    with pytest.raises(lorakit.TargetNotFoundError) as info:
        targets(llama, target_modules=["q_prj", "vproj"])
    message = str(info.value)
    assert "q_proj" in message and "v_proj" in message  # closest names
    assert "Linear" in message and "Embedding" in message  # kinds present / adaptable
    assert "all-linear" in message


def test_target_that_is_not_adaptable_says_so(llama):
    with pytest.raises(lorakit.TargetNotFoundError, match="LlamaRMSNorm"):
        targets(llama, target_modules=["input_layernorm"])


def test_error_leaves_model_untouched(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(lorakit.TargetNotFoundError):
        lorakit.adapt(llama, lorakit.AdapterConfig(target_modules=["nope"]))
    assert set(llama.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_bad_configs_are_refused():
    with pytest.raises(lorakit.ConfigError, match="unknown method"):
        lorakit.AdapterConfig(method="loha")
    with pytest.raises(lorakit.ConfigError, match="rank"):
        lorakit.AdapterConfig(r=0)
    with pytest.raises(lorakit.ConfigError, match="VeRA"):
        lorakit.AdapterConfig(method="vera", init="pissa")


def test_every_named_target_must_match_when_an_adapter_is_created(tmp_path):
    import copy

    base = tiny_llama(layers=1)
    with pytest.raises(lorakit.TargetNotFoundError, match=r"'qproj' \(closest: q_proj[,)].*while 'v_proj' did"):
        lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(target_modules=["qproj", "v_proj"]))
    # a file written by another tool may list names its model lacked: loading keeps PEFT's leniency
    adapted = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(adapted, tmp_path / "a")
    config = (tmp_path / "a" / "adapter_config.json").read_text().replace('"q_proj"', '"q_proj", "c_attn"')
    (tmp_path / "a" / "adapter_config.json").write_text(config)
    assert len(lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a").adapter_modules("default")) == 2


def test_train_refuses_a_misspelled_target_and_its_default_picks_the_architectures_names(tmp_path, capsys):
    from test_train import LLAMA, write_jsonl

    from lorakit.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 8)
    common = ["train", "--quiet", "--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--max-steps", "1",
              "--batch-size", "4", "--general-samples", "0"]
    assert main([*common, "--targets", "qproj,v_proj", "--out", str(tmp_path / "bad")]) == 2
    assert "'qproj' (closest: q_proj," in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*common, "--out", str(tmp_path / "good")]) == 0  # default: query,value,q_proj,v_proj,c_attn
    config = (tmp_path / "good" / "adapter" / "adapter_config.json").read_text()
    assert 'self_attn.q_proj"' in config and 'c_attn' not in config and 'query' not in config
