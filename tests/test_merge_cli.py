"""`lorakit merge` writes a plain Hugging Face folder that transformers loads without lorakit."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from test_train import write_classification
from torch.testing import assert_close

import lorakit
from lorakit.cli import main
from lorakit.embedded import default_model_dir


def test_merge_writes_a_plain_transformers_model(tmp_path):
    train = write_classification(tmp_path / "train.csv", 16)
    evaluation = write_classification(tmp_path / "eval.csv", 8, seed=1)
    run = tmp_path / "run"
    assert main(["train", "--quiet", "--model", "default", "--data", str(train), "--eval-data", str(evaluation),
                 "--out", str(run), "--max-steps", "2", "--batch-size", "4", "--max-length", "32",
                 "--lr", "1e-2"]) == 0
    merged = tmp_path / "merged"
    # the run folder itself is accepted where the adapter folder is
    assert main(["merge", "--model", "default", "--adapter", str(run), "--out", str(merged)]) == 0
    report = json.loads((merged / "lorakit_merge.json").read_text())
    assert report["max_logit_difference"] < 1e-4

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    inputs = tokenizer(["a good b", "c bad d"], return_tensors="pt", padding=True)
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    base = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=2).eval()
    adapted = lorakit.load_adapter(base, run / "adapter")
    with torch.no_grad():
        assert_close(plain(**inputs).logits, adapted(**inputs).logits, atol=1e-5, rtol=0)

    # A fresh interpreter loads it with transformers alone.
    code = (
        "import sys, transformers\n"
        f"m = transformers.AutoModelForSequenceClassification.from_pretrained({str(merged)!r})\n"
        "assert 'lorakit' not in sys.modules\n"
        "print(type(m).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "BertForSequenceClassification"


def test_merge_refuses_a_corrupt_adapter_before_loading(tmp_path, capsys):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{")
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    assert main(["merge", "--model", "default", "--adapter", str(folder), "--out", str(tmp_path / "m")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
