"""`lorakit generate`: the server's answer for one prompt, streamed to stdout and nothing else there.

A tiny random Llama with a byte-level HF tokenizer (one token per byte, so text round-trips) and
an lm_head that favours printable characters, so greedy answers are readable and far from ties.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from model_zoo import tiny_llama
from serve_fixtures import byte_tokenizer as serve_byte_tokenizer
from test_train import small, write_classification

import lorakit
from lorakit.cli import main
from lorakit.mixed import BASE
from lorakit.serve.engine import Engine
from lorakit.serve.jobs import ClassificationJob, Classified, Delta, GenerationJob, SamplingParams
from lorakit.serve.loading import build_engine
from lorakit.train.batches import chat_prompt_ids

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")
PROMPT = "The quick brown fox"


def byte_tokenizer():
    """The serve tests' byte-level HF tokenizer (BOS first), with a chat template."""
    tokenizer = serve_byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def folder_model(folder: Path, seed: int = 0) -> torch.nn.Module:
    """A tiny Llama saved with its tokenizer in ``folder`` (context: 128 positions)."""
    model = tiny_llama(hidden=32, layers=2, vocab=264, seed=seed)
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    tokenizer = byte_tokenizer()
    readable = [i for i in range(3, 259) if 32 <= ord(tokenizer.decode([i])[0]) < 127]
    keep = torch.zeros(model.lm_head.weight.shape[0], 1)
    keep[readable] = 20.0  # printable ASCII only, logits far apart: no EOS, no ties
    with torch.no_grad():
        model.lm_head.weight.mul_(keep)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """root/base (the model), root/adapters/tuned (a LoRA on it, recording the base's folder),
    root/other_base (same architecture, other weights)."""
    root = tmp_path_factory.mktemp("generate")
    model = folder_model(root / "base")
    folder_model(root / "other_base", seed=1)
    adapted = lorakit.AdaptedModel(model)
    adapted.add_adapter("tuned", lorakit.AdapterConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj")))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in adapted.adapter_modules("tuned").values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g))
    lorakit.save_adapter(adapted, root / "adapters" / "tuned", name="tuned", base_model_name_or_path=str(root / "base"))
    return root


@pytest.fixture(scope="module")
def server(zoo) -> Engine:
    """The engine `lorakit serve` builds for the same base and adapter."""
    return build_engine(str(zoo / "base"), zoo / "adapters")


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)  # the server's default temperature is 1


def served_text(engine: Engine, adapter: str, ids: list[int], params: SamplingParams) -> str:
    pieces: list[str] = []
    engine.run_batch([GenerationJob(adapter, ids, params, lambda e: pieces.append(e.text) if isinstance(e, Delta)
                                    else None)])
    return "".join(pieces)


def transformers_greedy(zoo: Path, adapter: bool, ids: list[int], max_tokens: int) -> str:
    """An independent reference: transformers' own generate() on the adapted model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo / "base").eval()
    if adapter:
        model = lorakit.load_adapter(model, zoo / "adapters" / "tuned")
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
    return byte_tokenizer().decode(out[0, x.shape[1]:], skip_special_tokens=True)


def generate(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["generate", "--threads", "1", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_answer_is_the_servers_and_transformers_and_stdout_holds_only_it(zoo, server, capsys):
    ids = server.encode_prompt(PROMPT)
    expected = served_text(server, "tuned", ids, greedy(20))
    assert len(expected) == 20
    assert expected == transformers_greedy(zoo, True, ids, 20)
    # no --model: the adapter records its base's folder
    code, out, _ = generate(capsys, "--adapter", str(zoo / "adapters" / "tuned"), "--max-tokens", "20", PROMPT)
    assert code == 0
    assert out == expected + "\n"


def test_the_answer_streams_piece_by_piece_with_a_flush_each(zoo):
    from lorakit.generate import GenerateOptions
    from lorakit.generate import generate as run

    class Recorder(io.StringIO):
        flushed: list[str]

        def flush(self) -> None:
            self.flushed.append(self.getvalue())

    out = Recorder()
    out.flushed = []
    run(GenerateOptions(PROMPT, model=str(zoo / "base"), adapter=str(zoo / "adapters" / "tuned"), max_tokens=6),
        out=out, notes=io.StringIO())
    answer = out.getvalue()
    assert len(out.flushed) == 7  # one token per byte: six pieces, then the final newline
    assert out.flushed[0] == answer[:1] and out.flushed[-1] == answer and answer.endswith("\n")


def test_sampling_with_a_seed_is_the_servers_and_repeats(zoo, server, capsys):
    ids = server.encode_prompt(PROMPT)
    params = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.9, seed=5)
    expected = served_text(server, "tuned", ids, params)
    args = ["--adapter", str(zoo / "adapters" / "tuned"), "--max-tokens", "16", "--temperature", "1.5",
            "--top-p", "0.9", "--seed", "5", PROMPT]
    first, second = generate(capsys, *args)[:2], generate(capsys, *args)[:2]
    assert first == second == (0, expected + "\n")
    assert expected != served_text(server, "tuned", ids, greedy(16))  # sampling did sample


def test_chat_uses_the_servers_chat_ids_with_the_system_message(zoo, server, capsys, monkeypatch):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = chat_prompt_ids(server.tokenizer, messages, 10**9)
    assert ids == server.render_chat(messages)  # the server's chat path
    assert ids[0] == 1 and ids[1] != 1  # the template's BOS, once
    assert server.tokenizer.decode(ids[1:]) == "[system] Be brief.\n[user] Hi there\n[assistant] "
    seen: list[list[int]] = []
    run_batch = Engine.run_batch

    def recording(self, jobs, take=None):
        seen.extend(job.prompt_ids for job in jobs)
        return run_batch(self, jobs, take)

    monkeypatch.setattr(Engine, "run_batch", recording)
    code, out, _ = generate(capsys, "--adapter", str(zoo / "adapters" / "tuned"), "--chat", "--system", "Be brief.",
                            "--max-tokens", "12", "Hi there")
    assert code == 0 and seen == [ids]
    assert out == served_text(server, "tuned", ids, greedy(12)) + "\n"


def test_compare_prints_the_bases_answer_then_the_adapters_labelled(zoo, server, capsys):
    ids = server.encode_prompt(PROMPT)
    base = served_text(server, BASE, ids, greedy(12))
    tuned = served_text(server, "tuned", ids, greedy(12))
    assert base != tuned and base == transformers_greedy(zoo, False, ids, 12)
    folder = str(zoo / "adapters" / "tuned")
    code, out, _ = generate(capsys, "--adapter", folder, "--compare", "--max-tokens", "12", PROMPT)
    assert code == 0
    assert out == f"=== base ===\n{base}\n=== adapter {folder} ===\n{tuned}\n"


def test_the_bare_base_and_a_prompt_from_stdin(zoo, server, capsys, monkeypatch):
    ids = server.encode_prompt(PROMPT)
    base = served_text(server, BASE, ids, greedy(10))
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    code, out, _ = generate(capsys, "--model", str(zoo / "base"), "--max-tokens", "10", "-")
    assert code == 0 and out == base + "\n"


def test_stop_strings_and_the_max_tokens_note_on_stderr(zoo, server, capsys):
    ids = server.encode_prompt(PROMPT)
    full = served_text(server, "tuned", ids, greedy(20))
    cut = next(k for k in range(1, len(full)) if full[k] not in full[:k])  # the first new character
    code, out, err = generate(capsys, "--adapter", str(zoo / "adapters" / "tuned"), "--max-tokens", "20",
                              "--stop", "@@never@@", "--stop", full[cut], PROMPT)
    assert code == 0 and out == full[:cut] + "\n" and "max-tokens" not in err
    code, out, err = generate(capsys, "--adapter", str(zoo / "adapters" / "tuned"), "--max-tokens", "20", PROMPT)
    assert out == full + "\n" and "stopped after --max-tokens 20" in err


def test_an_adapter_for_another_base_is_refused_naming_the_flag_that_loads_it_anyway(zoo, capsys):
    args = ["--model", str(zoo / "other_base"), "--adapter", str(zoo / "adapters" / "tuned"), "--max-tokens", "4",
            PROMPT]
    code, out, err = generate(capsys, *args)
    assert code == 2 and out == ""
    assert "different base weights" in err and "--ignore-fingerprint" in err and "check_fingerprint" not in err
    code, out, _ = generate(capsys, "--ignore-fingerprint", *args)
    assert code == 0 and len(out) == 5


def test_missing_adapter_folder_and_missing_model_are_clear_errors(zoo, tmp_path, capsys):
    code, out, err = generate(capsys, "--adapter", str(tmp_path / "nowhere"), PROMPT)
    assert code == 2 and out == "" and "nowhere" in err and "does not exist" in err
    code, _, err = generate(capsys, PROMPT)
    assert code == 2 and "give --model" in err
    unnamed = tmp_path / "unnamed"  # an adapter that does not record its base
    unnamed.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (unnamed / name).write_bytes((zoo / "adapters" / "tuned" / name).read_bytes())
    config = json.loads((unnamed / "adapter_config.json").read_text())
    (unnamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    code, _, err = generate(capsys, "--adapter", str(unnamed), PROMPT)
    assert code == 2 and "give --model" in err and "does not record" in err


def test_a_prompt_too_long_for_the_context_is_refused_saying_what_to_change(zoo, capsys):
    adapter = ["--adapter", str(zoo / "adapters" / "tuned")]
    code, out, err = generate(capsys, *adapter, "x" * 200)
    assert code == 2 and out == "" and "201 tokens" in err and "context of 128" in err and "shorten" in err
    code, _, err = generate(capsys, *adapter, "--max-tokens", "100", "x" * 99)  # 100 prompt tokens + 100 > 128
    assert code == 2 and "lower --max-tokens to at most 28" in err


def test_bad_flags_are_refused_before_loading(zoo, capsys):
    adapter = ["--adapter", str(zoo / "adapters" / "tuned")]
    assert generate(capsys, *adapter, "--system", "x", PROMPT)[2].count("use it with --chat") == 1
    assert "give --adapter" in generate(capsys, "--model", str(zoo / "base"), "--compare", PROMPT)[2]
    assert "--max-tokens must be" in generate(capsys, *adapter, "--max-tokens", "0", PROMPT)[2]
    assert "the prompt is empty" in generate(capsys, *adapter, "")[2]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    """A `lorakit train` run of a random BERT classifier, seed 3 (its base's weights are drawn with it)."""
    root = tmp_path_factory.mktemp("classify")
    train = write_classification(root / "train.csv")
    evaluation = write_classification(root / "eval.csv", 16, seed=1)
    run = root / "runs" / "sentiment"
    assert main(["train", "--quiet", *small(run, train, evaluation, "--seed", "3", "--threads", "1")]) == 0
    return run


def test_a_classifier_adapter_prints_the_label_and_the_probabilities_as_the_server(classifier_run, capsys):
    text = "a b good c"
    code, out, _ = generate(capsys, "--adapter", str(classifier_run), text)  # the run says model and seed
    assert code == 0
    label, probabilities = out.splitlines()
    engine = build_engine(_run_model(classifier_run), classifier_run.parent, seed=3)  # `lorakit serve` on it
    events = []
    engine.run_batch([ClassificationJob("sentiment", engine.encode_inputs([text]), events.append)])
    result = next(e for e in events if isinstance(e, Classified)).results[0]
    assert label == result["label"] and label in ("good", "bad")
    ranked = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])
    assert probabilities == " ".join(f"p({name})={p:.4f}" for name, p in ranked)


def test_a_classifier_refuses_chat_compare_with_a_headless_base_and_a_prompt_too_long(classifier_run, capsys):
    code, out, err = generate(capsys, "--adapter", str(classifier_run), "--compare", "a good b")
    assert code == 2 and out == "" and "no trained classification head" in err
    code, _, err = generate(capsys, "--adapter", str(classifier_run), "--chat", "a good b")
    assert code == 2 and "--chat needs a causal LM" in err
    code, _, err = generate(capsys, "--adapter", str(classifier_run), "x" * 600)  # BERT: 512 positions
    assert code == 2 and "too long for the model: it has 600 tokens; the limit is 512" in err


def _run_model(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["model"]
