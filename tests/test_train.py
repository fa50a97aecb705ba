"""`lorakit train` end to end on tiny random models: outputs, determinism, baselines, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.train.data import DataError, lm_examples, read_rows
from lorakit.train.models import ByteTokenizer

BERT = "random:bert,hidden=32,layers=1,heads=2,intermediate=64"
LLAMA = "random:llama,hidden=32,layers=1,heads=2,kv_heads=2,intermediate=64"


def write_classification(path: Path, n: int = 48, seed: int = 0, labels=("good", "bad")) -> Path:
    """A learnable toy task: the label is written in the text."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(n):
        label = rng.choice(labels)
        filler = " ".join(rng.choice(["a", "b", "c", "d"]) for _ in range(rng.randint(2, 8)))
        lines.append(f"{filler} {label} {filler},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(*args: str) -> int:
    return main(["train", "--quiet", *args])


@pytest.fixture
def data(tmp_path) -> tuple[Path, Path]:
    return write_classification(tmp_path / "train.csv"), write_classification(tmp_path / "eval.csv", 16, seed=1)


def small(out: Path, data_file: Path, eval_file: Path, *extra: str) -> list[str]:
    return ["--model", BERT, "--data", str(data_file), "--eval-data", str(eval_file), "--out", str(out),
            "--targets", "query,value", "--batch-size", "8", "--max-steps", "6", "--eval-every", "3",
            "--max-length", "32", "--lr", "5e-3", *extra]


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_classify_run_writes_every_output(tmp_path, data):
    out = tmp_path / "run"
    assert run(*small(out, *data)) == 0
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("metric_name", "metric_before", "metric_after", "trainable_params", "total_params",
                "adapter_bytes", "seconds", "examples_per_second"):
        assert key in summary
    assert summary["metric_name"] == "accuracy" and summary["steps"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "accuracy" in r] == [0, 3, 6]
    assert summary["adapter_bytes"] == (out / "adapter" / "adapter_model.safetensors").stat().st_size
    # The adapter file carries the classifier head and loads back onto the same random base.
    assert any(k.endswith("classifier.weight") for k in adapter_tensors(out))
    # ... and the label names, in training's order, for `lorakit merge` and `lorakit serve`.
    metadata = lorakit.io.adapter_files.read_adapter(out / "adapter").lorakit
    assert metadata["label_names"] == ["bad", "good"] and metadata["task"] == "classify"


def test_same_seed_same_adapter_twice(tmp_path, data):
    assert run(*small(tmp_path / "a", *data)) == 0
    assert run(*small(tmp_path / "b", *data)) == 0
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["lora-fa", "vera", "dora", "delta-lora", "full", "head"])
def test_every_method_trains(tmp_path, data, method):
    out = tmp_path / method
    extra = ["--method", method, "--delta-start", "2"]
    assert run(*small(out, *data), *extra) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 6


def test_loraplus_and_gradient_svd(tmp_path, data, capsys):
    assert run(*small(tmp_path / "plus", *data), "--loraplus-ratio", "16") == 0
    assert "lora_B: lr 0.08" in capsys.readouterr().out  # the groups are logged at step 0
    assert run(*small(tmp_path / "gsvd", *data), "--init", "gradient-svd", "--init-batches", "2") == 0


def test_bf16_autocast_trains_float32_adapters_close_to_float32(tmp_path, data):
    """--bf16 on (the default on AMX CPUs and bf16 GPUs): matrix products in bf16, adapter
    weights and optimizer state in float32, and the first step's loss close to float32's."""
    from lorakit.train.loop import bf16_is_fast

    losses = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        assert run(*small(out, *data, "--bf16", mode)) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if "loss" in r]
        assert all(t.dtype == torch.float32 for t in adapter_tensors(out).values())
    assert losses["on"] != losses["off"], "bf16 autocast did nothing"
    assert abs(losses["on"][0] - losses["off"][0]) < 0.02 * losses["off"][0]
    assert bf16_is_fast(torch.device("cpu")) == bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def test_causal_lm_run(tmp_path):
    rows = [{"prompt": f"Q{i}: ", "completion": f"A{i % 3}"} for i in range(24)]
    data = write_jsonl(tmp_path / "lm.jsonl", rows)
    out = tmp_path / "lm"
    assert main(["train", "--quiet", "--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--out", str(out),
                 "--max-steps", "4", "--batch-size", "4", "--targets", "all-linear"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric_name"] == "perplexity" and summary["metric_after"] > 1.0


def test_answer_only_loss_masks():
    from lorakit.train.batches import IGNORE, encode_lm

    tok = ByteTokenizer(512)
    rows = [{"text": "hello", "_line": 1}, {"prompt": "ab", "completion": "cd", "_line": 2},
            {"instruction": "say", "input": "", "output": "ok", "_line": 3},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "_line": 4}]
    examples = lm_examples(rows, "x.jsonl", tok)
    encoded = encode_lm(examples, tok, 256, "x.jsonl")
    for ex, enc in zip(examples, encoded, strict=True):
        answer = [*tok.encode(ex.completion), tok.eos_token_id]
        assert enc.labels[-len(answer):] == answer
        assert all(label == IGNORE for label in enc.labels[:-len(answer)])
    assert examples[2].prompt.startswith("### Instruction:\nsay")
    assert examples[3].prompt == "<|user|>\nhi\n<|assistant|>\n" and examples[3].completion == "yo\n"


def test_chat_uses_the_tokenizers_template():
    class Templated(ByteTokenizer):
        chat_template = "set"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
            return text + ("[assistant]" if add_generation_prompt else "")

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "_line": 1}]
    (example,) = lm_examples(rows, "c.jsonl", Templated(512))
    assert example.prompt == "[user]hi[assistant]" and example.completion == "yo"


# -- bad input: a clear error before training starts, nothing half-written --------------------
def refused(tmp_path, capsys, args: list[str], message: str) -> None:
    out = tmp_path / "never"
    assert main(["train", "--quiet", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_missing_column(tmp_path, capsys, data):
    refused(tmp_path, capsys, ["--model", BERT, "--data", str(data[0]), "--text-column", "body"],
            "no text column 'body'; columns are: text, label")


def test_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    refused(tmp_path, capsys, ["--model", BERT, "--data", str(empty)], "holds no examples")


def test_label_unseen_in_training(tmp_path, capsys, data):
    odd = write_classification(tmp_path / "odd.csv", 8, labels=("good", "meh"))
    refused(tmp_path, capsys, ["--model", BERT, "--data", str(data[0]), "--eval-data", str(odd)],
            "labels ['meh'] never appear in the training data")


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    refused(tmp_path, capsys, ["--task", "causal-lm", "--model", LLAMA, "--data", str(bad)], f"{bad}:2: malformed JSON")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        read_rows(bad)


def test_unknown_target(tmp_path, capsys, data):
    refused(tmp_path, capsys, ["--model", BERT, "--data", str(data[0]), "--targets", "qurey"], "Closest names: query")


def test_model_folder_without_weights(tmp_path, capsys, data):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    refused(tmp_path, capsys, ["--model", str(folder), "--data", str(data[0])], "has no weights")


def test_existing_run_is_not_overwritten(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert run(*small(out, *data)) == 0
    assert run(*small(out, *data)) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_yaml_config_and_flag_override(tmp_path, data):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: '{BERT}'\ndata: {data[0]}\neval_data: {data[1]}\nmax_steps: 2\nrank: 2\n"
                      "targets: query\nmax_length: 32\n")
    out = tmp_path / "yaml"
    assert main(["train", "--quiet", "--config", str(config), "--rank", "3", "--out", str(out)]) == 0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 3
    assert lorakit.read_adapter(out / "adapter").config.r == 3


def test_a_run_that_collapses_to_one_label_says_so(tmp_path, data, capsys):
    """A far too high lr: every evaluation example gets the same label, and the encoder is rewritten."""
    out = tmp_path / "hot"
    assert run(*small(out, *data, "--method", "full", "--lr", "3.0", "--bf16", "off")) == 0
    warnings = json.loads((out / "summary.json").read_text())["warnings"]
    assert any("predicts 'bad' for 16 of 16" in w for w in warnings), warnings
    assert any("rewrote the encoder" in w for w in warnings)
    assert "warning: the saved model predicts" in capsys.readouterr().out
    calm = tmp_path / "calm"
    learns = ("--bf16", "off", "--lr", "1e-2", "--max-steps", "48", "--targets", "all-linear")
    assert run(*small(calm, *data, *learns)) == 0
    assert not any("predicts" in w for w in json.loads((calm / "summary.json").read_text())["warnings"])


def test_chat_data_without_the_causal_task_is_told_which_task_it_is(tmp_path, capsys):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "yo"}]}] * 4)
    assert run("--model", BERT, "--data", str(chat), "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "chat ('messages')" in err and "--task causal-lm" in err


def test_a_json_array_file_is_read_and_its_errors_say_where(tmp_path):
    rows = [{"text": f"t{i} good", "label": "good" if i % 2 else "bad"} for i in range(6)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=2))
    got = read_rows(path)
    assert [r["text"] for r in got] == [r["text"] for r in rows] and got[2]["_line"] == "item 3"
    path.write_text('[\n  {"text": "a", "label": "b"},\n  {"text": "c" "label": "d"}\n]')
    with pytest.raises(DataError, match=r"rows.json:3: malformed JSON \(Expecting ',' delimiter at column 16\)"):
        read_rows(path)
    path.write_text('[{"text": "a"}, 3]')
    with pytest.raises(DataError, match="item 2 of the array must be a JSON object"):
        read_rows(path)


def test_yaml_keys_of_other_tools_get_a_did_you_mean(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1e-4\nrnak: 8\nlora_alpha: 16\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "'learning_rate' (did you mean 'lr'?)" in err and "'rnak' (did you mean 'rank'?)" in err
    assert "'lora_alpha' (did you mean 'alpha'?)" in err
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"lorakit {lorakit.__version__}"


def test_evaluations_are_printed_as_they_happen_and_the_summary_names_what_was_saved(tmp_path, data, capsys):
    out = tmp_path / "loud"
    args = small(out, *data, "--bf16", "off", "--general-samples", "2")
    assert main(["train", *args]) == 0  # not --quiet
    printed = capsys.readouterr().out
    assert "step 3: accuracy" in printed and "step 6: accuracy" in printed and "(best " in printed
    assert "saved: the evaluation of step 6 (accuracy " in printed and str(out / "adapter") in printed


def test_resume_refuses_changes_that_alter_the_run_and_applies_safe_ones(tmp_path, data, capsys):
    out = tmp_path / "run"
    args = small(out, *data, "--bf16", "off", "--general-samples", "0")
    assert run(*args, "--max-steps", "3") == 0
    capsys.readouterr()
    assert run(*args, "--max-steps", "3", "--resume", "--rank", "16", "--lr", "1e-3") == 2
    err = capsys.readouterr().err
    assert "--rank 8 → 16" in err and "--lr 0.005 → 0.001" in err and "TypeError" not in err
    assert run(*args, "--max-steps", "6", "--resume") == 0
    assert "changed: --max-steps 3 → 6" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_ctrl_c_says_where_it_stopped_and_how_to_go_on(tmp_path, data, capsys, monkeypatch):
    from lorakit.train.loop import Trainer

    original = Trainer.train_step

    def interrupted(self):
        if self.state["step"] == 4:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    out = tmp_path / "run"
    args = small(out, *data, "--bf16", "off", "--general-samples", "0")
    assert run(*args) == 130
    err = capsys.readouterr().err
    assert "stopped at step 4; rerun the same command with --resume" in err and "Traceback" not in err
    monkeypatch.setattr(Trainer, "train_step", original)
    assert run(*args, "--resume") == 0
    assert "resumed from step 3" in capsys.readouterr().out


def test_examples_cut_or_dropped_at_max_length_are_counted_and_too_many_drops_refused(tmp_path, capsys):
    rows = [{"prompt": "p" * 40, "completion": "answer"}] + [{"prompt": "q", "completion": "a" * 40}] * 3 + \
        [{"prompt": "q", "completion": "ok"}] * 16
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = ["--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--eval-data", str(data),
              "--max-steps", "1", "--batch-size", "4", "--max-length", "24", "--general-samples", "0"]
    assert run(*common, "--out", str(tmp_path / "strict"), "--max-drop", "0") == 2
    assert "1 of 20 train examples (5%) have prompts of 24 tokens or more" in capsys.readouterr().err
    out = tmp_path / "ok"
    assert run(*common, "--out", str(out)) == 0  # 5% is within the default --max-drop
    data_fit = json.loads((out / "summary.json").read_text())["data"]
    assert data_fit["train"] == {"examples": 20, "dropped": 1, "truncated": 3}
    assert "1 of 20 train examples dropped (prompt fills it); 3 of 20 train examples cut" in capsys.readouterr().out


def test_chat_is_tokenized_alike_in_training_and_serving_with_one_bos():
    """A tokenizer that adds BOS and a template that writes {{ bos_token }} (Llama, Mistral, Gemma)."""
    from serve_fixtures import byte_tokenizer

    from lorakit.train import batches as B

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    history = [{"role": "user", "content": "hi"}]
    example = lm_examples([{"messages": [*history, {"role": "assistant", "content": "yo"}], "_line": 1}], "x",
                          tokenizer)[0]
    (encoded,) = B.encode_lm([example], tokenizer, 64, "x")
    prompt = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label == B.IGNORE]
    served = B.chat_prompt_ids(tokenizer, history, 64)  # what lorakit serve feeds the model
    assert prompt == served
    assert served.count(tokenizer.bos_token_id) == 1 and served[0] == tokenizer.bos_token_id


def test_train_help_groups_its_options_and_describes_every_one(capsys):
    from dataclasses import fields

    from lorakit.train.config import TrainConfig, _comment_help, _groups

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for title in ("model and data:", "the adapter:", "optimisation:", "evaluation and checkpoints:", "run:"):
        assert f"\n{title}\n" in text
    described = _comment_help()
    assert [f.name for f in fields(TrainConfig) if not described.get(f.name)] == []
    assert set(_groups()) == {f.name for f in fields(TrainConfig)}


def test_log_tensorboard_writes_the_metrics_as_event_files(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = small(out, *data, "--log", "tensorboard", "--general-samples", "0")
    assert run(*args) == 0
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == losses
    assert [e.step for e in events.Scalars("eval/accuracy")] == [r["step"] for r in rows if "accuracy" in r]
    assert {"train/lr", "train/loss", "eval/accuracy"} <= set(events.Tags()["scalars"])


def test_log_without_tensorboard_installed_is_refused_before_anything_is_written(tmp_path, data, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name == "tensorboard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    refused(tmp_path, capsys, small(tmp_path / "never", *data, "--log", "tensorboard"),
            "pip install 'lorakit[tensorboard]'")


def test_method_options_reach_the_adapter_and_a_typo_is_refused_before_the_run(tmp_path, data, capsys):
    out = tmp_path / "vera"
    assert run(*small(out, *data, "--method", "vera", "--method-options", "projection_seed=7,d_initial=0.25",
                      "--general-samples", "0")) == 0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["projection_prng_key"] == 7 and saved["vera_dropout"] == 0.0
    refused(tmp_path, capsys, small(tmp_path / "never", *data, "--method", "vera", "--method-options", "d_init=0.1"),
            "has no option 'd_init'")
    refused(tmp_path, capsys, small(tmp_path / "never", *data, "--method", "full", "--method-options", "a=1"),
            "takes no --method-options")
