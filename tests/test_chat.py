"""Chat examples: the loss covers every assistant turn (or the last), training and serving read a
conversation into the same tokens, and --chat-template replaces the tokenizer's template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_fixtures import byte_tokenizer

from lorakit.cli import main
from lorakit.train import batches as B
from lorakit.train.chat import TEMPLATE_FILE
from lorakit.train.data import DataError, lm_examples
from lorakit.train.models import ByteTokenizer

LLAMA = "random:llama,hidden=32,layers=1,heads=2,kv_heads=2,intermediate=64"
# The Llama/Mistral pattern: {{ bos_token }} in the template of a tokenizer that adds BOS itself,
# and an end-of-turn token that is the tokenizer's EOS.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "ok"}]


def templated_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def answers(tokenizer, encoded: B.Encoded) -> list[str]:
    """The trained stretches of an encoded example, decoded (special tokens kept)."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label == B.IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def encode(tokenizer, messages, turns="all") -> B.Encoded:
    (example,) = lm_examples([{"messages": messages, "_line": 1}], "x.jsonl", tokenizer, turns)
    (encoded,) = B.encode_lm([example], tokenizer, 512, "x.jsonl")
    return encoded


def test_every_assistant_turn_carries_the_loss_by_default_and_only_the_last_with_turns_last():
    tokenizer = templated_tokenizer()
    every = encode(tokenizer, CONVERSATION)
    assert answers(tokenizer, every) == ["yo</s>", "ok</s>"]  # transformers' Jinja drops a block's newline
    last = encode(tokenizer, CONVERSATION, "last")
    assert answers(tokenizer, last) == ["ok</s>"]
    assert every.input_ids == last.input_ids  # the same tokens; only what the loss covers differs
    # the template closed the turn with EOS: no second EOS is appended
    assert every.input_ids.count(tokenizer.eos_token_id) == 2


def test_a_multi_turn_history_is_the_same_tokens_in_training_and_serving():
    tokenizer = templated_tokenizer()
    encoded = encode(tokenizer, CONVERSATION)
    last_answer = len(tokenizer.encode("ok</s>", add_special_tokens=False))
    served = B.chat_prompt_ids(tokenizer, CONVERSATION[:-1], 10**6)  # what lorakit serve feeds the model
    assert encoded.input_ids[:-last_answer] == served
    assert served.count(tokenizer.bos_token_id) == 1 and served[0] == tokenizer.bos_token_id


def test_without_a_template_every_turn_trains_and_the_last_teaches_the_stop():
    tokenizer = ByteTokenizer(300)
    encoded = encode(tokenizer, CONVERSATION)
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != B.IGNORE]
    assert trained == [*tokenizer.encode("yo\nok\n"), tokenizer.eos_token_id]
    served = B.chat_prompt_ids(tokenizer, CONVERSATION[:-1], 10**6)
    assert encoded.input_ids[:len(served)] == served
    assert tokenizer.decode(served) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nyo\n<|user|>\nand?\n" \
        "<|assistant|>\n"


def test_a_template_that_rewrites_earlier_turns_trains_the_last_turn_only_when_asked():
    tokenizer = byte_tokenizer()
    # drops every assistant turn but the last from the history (as reasoning-stripping templates do)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                               "[{{ m['role'] }}]{{ m['content'] }}\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}")
    with pytest.raises(DataError, match="--chat-turns last"):
        encode(tokenizer, CONVERSATION)
    encoded = encode(tokenizer, CONVERSATION, "last")
    assert answers(tokenizer, encoded) == ["ok\n</s>"]
    served = B.chat_prompt_ids(tokenizer, CONVERSATION[:-1], 10**6)
    assert encoded.input_ids[:len(served)] == served  # one piece, as the server reads it


def test_chat_template_file_is_used_saved_with_the_adapter_and_read_back_by_eval(tmp_path: Path, capsys):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<<assistant>>{% endif %}")
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": f"b{i}"}]}
            for i in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--out", str(out),
                 "--chat-template", str(template), "--max-steps", "2", "--batch-size", "4",
                 "--general-samples", "0"]) == 0
    assert (out / "adapter" / TEMPLATE_FILE).read_text() == template.read_text()
    tokenizer = ByteTokenizer(300)
    tokenizer.chat_template = template.read_text()
    (example,) = lm_examples([{**rows[0], "_line": 1}], "x", tokenizer)
    assert example.prompt.startswith("<<user>>q0\n<<assistant>>a0\n<<user>>again\n<<assistant>>")
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--general", "none", "--out", str(tmp_path / "eval"),
                 "--quiet"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["chat_template"] == "from the adapter"


def test_generate_reads_chats_with_the_adapters_template(tmp_path: Path, capsys, monkeypatch):
    import lorakit.serve.engine as engine

    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}=>{% endif %}<<{{ m['content'] }}>>"
                "{% endfor %}{% if add_generation_prompt %}=>{% endif %}")
    out = tmp_path / "run"
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(8)))
    (tmp_path / "t.jinja").write_text(template)
    assert main(["train", "--quiet", "--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--out", str(out),
                 "--chat-template", str(tmp_path / "t.jinja"), "--max-steps", "1", "--batch-size", "4",
                 "--general-samples", "0"]) == 0
    seen = []
    original = engine.chat_prompt_ids

    def recording(tokenizer, messages, max_length, template=None):
        ids = original(tokenizer, messages, max_length, template)
        seen.append(tokenizer.decode(ids))
        return ids

    monkeypatch.setattr(engine, "chat_prompt_ids", recording)
    assert main(["generate", "--adapter", str(out), "--chat", "--max-tokens", "1", "hello"]) == 0
    assert seen == ["<<hello>>=>"]


def test_a_missing_or_broken_chat_template_is_refused_before_training(tmp_path: Path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    for path, message in ((tmp_path / "none.jinja", "does not exist"), (broken, "broken.jinja:1")):
        out = tmp_path / "never"
        assert main(["train", "--quiet", "--task", "causal-lm", "--model", LLAMA, "--data", str(data),
                     "--out", str(out), "--chat-template", str(path)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_the_server_reads_each_adapters_chats_with_the_template_it_was_trained_with(tmp_path: Path):
    pytest.importorskip("fastapi")
    from serve_fixtures import build_folder

    from lorakit.serve import build_engine

    build_folder(tmp_path)
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}=>{% endif %}<<{{ m['content'] }}>>"
                "{% endfor %}{% if add_generation_prompt %}=>{% endif %}")
    (tmp_path / "adapters" / "a0" / TEMPLATE_FILE).write_text(template)
    engine = build_engine(str(tmp_path / "base"), tmp_path / "adapters")
    messages = [{"role": "user", "content": "hi"}]
    own = engine.render_chat(messages, "a0")
    assert engine.tokenizer.decode(own, skip_special_tokens=False) == "<<hi>>=>"  # the template writes no BOS
    assert engine.render_chat(messages, "a1") == engine.render_chat(messages) == B.chat_prompt_ids(
        engine.tokenizer, messages, 10**6) != own
