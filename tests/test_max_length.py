"""--max-length chosen from the data when not given: a percentile of the training examples' lengths,
capped, reported, recorded where eval and a resume read it; texts cut keep their closing token."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lorakit.cli import main
from lorakit.train import batches as B
from lorakit.train.data import ClassifyData
from lorakit.train.models import ByteTokenizer

LLAMA = "random:llama,hidden=32,layers=1,heads=2,kv_heads=2,intermediate=64"


class Limited(ByteTokenizer):
    model_max_length = 64


def test_the_chosen_length_is_the_99th_percentile_capped_at_2048_and_the_tokenizers_limit():
    tokenizer = ByteTokenizer(300)
    lengths = list(range(1, 201))  # one example of each length 1..200
    choice = B.choose_length(lengths, None, tokenizer)
    assert (choice.tokens, choice.chosen_from_data, choice.longest) == (198, True, 200)
    assert choice.fitting == 198 / 200
    assert B.choose_length([10] * 99 + [50_000], None, tokenizer).tokens == 10  # one outlier does not set it
    assert B.choose_length([5000] * 10, None, tokenizer).tokens == B.LONGEST_CHOSEN
    assert B.choose_length(lengths, None, Limited(300)).tokens == 64
    given = B.choose_length(lengths, 100, Limited(300))
    assert (given.tokens, given.chosen_from_data) == (64, False)
    assert "chosen from the data" not in given.line() and "--max-length" in given.line()


def test_a_run_without_max_length_chooses_it_from_the_data_reports_and_records_it(tmp_path: Path, capsys):
    rows = [{"prompt": "q" * 10, "completion": "a" * n} for n in range(5, 305)]  # 16..315 tokens
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--out", str(out),
                 "--max-steps", "1", "--batch-size", "4", "--general-samples", "0"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    chosen = summary["max_length"]
    assert chosen["from"] == "the data" and chosen["tokens"] <= chosen["longest"] <= 315
    assert f"max length {chosen['tokens']} tokens, chosen from the data" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["max_length"] == chosen["tokens"]
    # the examples longer than the choice were cut, and counted (prompt + answer + EOS tokens each)
    cut = sum(part["truncated"] for part in summary["data"].values())
    assert cut == sum(11 + len(r["completion"]) > chosen["tokens"] for r in rows) > 0
    # a resume chooses the same length again from the same data, so nothing is refused
    assert main(["train", "--quiet", "--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--out",
                 str(out), "--max-steps", "2", "--batch-size", "4", "--general-samples", "0", "--resume"]) == 0


def test_a_text_cut_at_max_length_keeps_its_closing_special_token():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[CLS]": 0, "[SEP]": 1, "[PAD]": 2, **{ch: i + 3 for i, ch in enumerate("abcdefgh ")}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[PAD]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 0),
                                                                                                ("[SEP]", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")
    data = ClassifyData(["abcdefgh", "ab"], [0, 1], ["x", "y"])
    fit = B.Fit()
    encoded = B.encode_classification(data, tokenizer, 6, fit)
    assert encoded[0].input_ids == [0, 3, 4, 5, 6, 1]  # [CLS] a b c d [SEP]: cut, closed
    assert encoded[1].input_ids == [0, 3, 4, 1]
    assert fit.as_dict() == {"examples": 2, "dropped": 0, "truncated": 1}
