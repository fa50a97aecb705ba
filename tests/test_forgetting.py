"""Forgetting on general text: exact zero for an untrained adapter, the cross-entropy written out by
hand, positive forgetting after a narrow task, what `lorakit train` records, and bad general-text files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_train import BERT, LLAMA, run, small, write_classification, write_jsonl
from torch import nn

import lorakit
from lorakit.errors import GeneralTextError
from lorakit.forgetting import GeneralMeasure, compare_general, measure_general
from lorakit.general_text import read_passages, shipped_passages
from lorakit.train.models import ByteTokenizer, load_model

TOKENIZER = ByteTokenizer(512)
PASSAGES = ["A short one.", "General text about rivers, mountains and the people who live near them.", "Hi"]


def adapted(spec: str, task: str) -> lorakit.AdaptedModel:
    model = load_model(spec, task, num_labels=2 if task == "classify" else None, seed=0)
    targets = "all-linear" if task == "causal-lm" else ["query", "value"]
    return lorakit.adapt(model, lorakit.AdapterConfig(r=4, alpha=8, target_modules=targets))


def lora_b(model: lorakit.AdaptedModel) -> list[torch.Tensor]:
    return [module.lora_B for module in model.adapter_modules("default").values()]


# -- an adapter with B = 0 changes nothing ---------------------------------------------------------
def test_fresh_adapter_forgets_exactly_nothing_causal_lm():
    model = adapted(LLAMA, "causal-lm")
    assert all(b.abs().sum() == 0 for b in lora_b(model))
    model.train()  # measure_general must switch to eval (no dropout) and back
    with model.base_only():
        before = measure_general(model, TOKENIZER, PASSAGES, batch_size=2)
    after = measure_general(model, TOKENIZER, PASSAGES, batch_size=2)
    assert model.training
    figures = compare_general(before, after)
    assert figures["forgetting_nats"] == 0.0 and figures["nats_before"] == figures["nats_after"]
    assert torch.equal(before.loss_sums, after.loss_sums)
    assert before.embeddings is None and before.loss_sums.dtype == torch.float64
    # The measure sees the adapter: with B ≠ 0 the same call no longer gives zero.
    with torch.no_grad():
        for b in lora_b(model):
            b.normal_(0, 0.5)
    assert compare_general(before, measure_general(model, TOKENIZER, PASSAGES))["forgetting_nats"] != 0.0


def test_fresh_adapter_keeps_embeddings_exactly_encoder():
    model = adapted(BERT + ",hidden_dropout_prob=0.3", "classify")
    model.train()  # BERT's dropout would move the embeddings if the measure ran in training mode
    with model.base_only():
        before = measure_general(model, TOKENIZER, PASSAGES, batch_size=2)
    after = measure_general(model, TOKENIZER, PASSAGES, batch_size=2)
    assert model.training
    assert before.loss_sums is None and before.embeddings.shape == (3, 32)
    assert compare_general(before, after) == {"embedding_cosine": 1.0, "embedding_drift": 0.0}
    with torch.no_grad():
        for b in lora_b(model):
            b.normal_(0, 0.5)
    assert compare_general(before, measure_general(model, TOKENIZER, PASSAGES))["embedding_cosine"] < 1.0


# -- the cross-entropy and the pooling, by hand ----------------------------------------------------
class TableLM(nn.Module):
    """logits[t] = table[token t]: every next-token cross-entropy can be written out by hand."""

    def __init__(self, vocab: int = 512) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


class TableEncoder(TableLM):
    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(last_hidden_state=self.table[input_ids], logits=self.table[input_ids].sum(1))


def test_loss_sums_are_shifted_cross_entropy_without_padding():
    model = TableLM()
    passages = ["abcd", "xy", "hello world"]  # different lengths: rows 1 and 2 of a batch carry padding
    measure = measure_general(model, TOKENIZER, passages, batch_size=3)
    for row, text in enumerate(passages):
        ids = TOKENIZER.encode(text)
        by_hand = sum(F.cross_entropy(model.table[ids[t]].detach(), torch.tensor(ids[t + 1])).item()
                      for t in range(len(ids) - 1))  # token t predicts token t + 1; the first is never a label
        assert measure.loss_sums[row].item() == pytest.approx(by_hand, rel=1e-6)
        assert measure.token_counts[row].item() == len(ids) - 1
    one_by_one = measure_general(model, TOKENIZER, passages, batch_size=1)
    assert torch.allclose(one_by_one.loss_sums, measure.loss_sums, rtol=1e-6, atol=0)
    nats = compare_general(measure, measure)["nats_before"]
    assert nats == pytest.approx(measure.loss_sums.sum().item() / (3 + 1 + 10))


def test_max_length_truncates_the_passages():
    measure = measure_general(TableLM(), TOKENIZER, ["a" * 50], max_length=8)
    assert measure.token_counts.tolist() == [7]


def test_embeddings_are_masked_means_of_the_last_hidden_state():
    model = TableEncoder()
    measure = measure_general(model, TOKENIZER, ["abc", "z"], batch_size=2)
    for row, text in enumerate(["abc", "z"]):
        expected = model.table[TOKENIZER.encode(text)].detach().mean(0)
        assert torch.allclose(measure.embeddings[row], expected, atol=1e-6)
    assert measure.loss_sums is None  # 2-D logits: not a causal LM


def test_compare_refuses_measures_of_different_kinds_or_passages():
    lm = measure_general(TableLM(), TOKENIZER, ["abc", "de"])
    encoder = measure_general(TableEncoder(), TOKENIZER, ["abc", "de"])
    other = measure_general(TableLM(), TOKENIZER, ["abc", "def"])
    with pytest.raises(lorakit.ConfigError, match="causal LM"):
        compare_general(lm, encoder)
    with pytest.raises(lorakit.ConfigError, match="different passages"):
        compare_general(lm, other)
    assert GeneralMeasure.from_dict(lm.as_dict()) == lm


# -- a narrow task forgets -------------------------------------------------------------------------
def test_training_on_a_narrow_task_forgets_general_text():
    torch.manual_seed(0)
    model = load_model(LLAMA, "causal-lm", seed=0)
    # A base that knows something: a few full steps on general text the measurement does not use.
    general = torch.tensor([TOKENIZER.encode(t)[:64] for t in shipped_passages(40)[8:]])
    _fit(model, model.parameters(), [general[i:i + 8] for i in range(0, 32, 8)], steps=30)
    adapter = lorakit.adapt(model, lorakit.AdapterConfig(r=8, alpha=16, target_modules="all-linear"))
    measured = shipped_passages(8)
    with adapter.base_only():
        before = measure_general(adapter, TOKENIZER, measured, max_length=64)
    narrow = torch.tensor([TOKENIZER.encode("0123456789" * 6)])
    losses = _fit(adapter, adapter.trainable_parameters(), [narrow], steps=20)
    assert losses[-1] < losses[0]
    figures = compare_general(before, measure_general(adapter, TOKENIZER, measured, max_length=64))
    assert figures["forgetting_nats"] > 0.1, figures
    with adapter.base_only():  # the base itself is untouched
        assert compare_general(before, measure_general(adapter, TOKENIZER, measured, max_length=64))[
            "forgetting_nats"] == 0.0


def _fit(model: nn.Module, params, batches: list[torch.Tensor], steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(list(params), lr=1e-2)
    model.train()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# -- lorakit train records it ----------------------------------------------------------------------
def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_classify_run_records_embedding_cosine(tmp_path, capsys):
    data = write_classification(tmp_path / "train.csv"), write_classification(tmp_path / "eval.csv", 16, seed=1)
    out = tmp_path / "run"
    assert run(*small(out, *data), "--general-samples", "12") == 0
    summary = json.loads((out / "summary.json").read_text())
    general = summary["general"]
    assert general["passages"] == 12 and general["source"] == "shipped" and general["seconds"] > 0
    evaluations = [r for r in records(out) if "accuracy" in r]
    assert [r["step"] for r in evaluations] == [0, 3, 6]
    assert evaluations[0]["embedding_cosine"] == 1.0  # the reference itself
    assert all(0.0 < r["embedding_cosine"] < 1.0 for r in evaluations[1:])
    best = next(r for r in evaluations if r["step"] == summary["best_step"])
    assert general["embedding_cosine"] == best["embedding_cosine"]
    assert general["embedding_drift"] == pytest.approx(1.0 - best["embedding_cosine"])
    assert f"general-text embedding cosine {best['embedding_cosine']:.4f}" in capsys.readouterr().out


def test_causal_lm_run_records_forgetting_on_a_general_file(tmp_path, capsys):
    rows = [{"prompt": f"Q{i}: ", "completion": "7777777"} for i in range(24)]
    data = write_jsonl(tmp_path / "lm.jsonl", rows)
    general_file = tmp_path / "general.txt"
    general_file.write_text("First passage,\nover two lines.\n\nSecond passage.\n\n\nThird one here.\n")
    out = tmp_path / "lm"
    assert run("--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--out", str(out), "--max-steps", "6",
               "--eval-every", "3", "--batch-size", "4", "--targets", "all-linear", "--lr", "1e-2",
               "--general-data", str(general_file)) == 0
    summary = json.loads((out / "summary.json").read_text())
    general = summary["general"]
    assert general["passages"] == 3 and general["source"] == str(general_file)
    evaluations = [r for r in records(out) if "perplexity" in r]
    assert [r["step"] for r in evaluations] == [0, 3, 6]
    assert evaluations[0]["forgetting_nats"] == 0.0
    assert all(r["forgetting_nats"] != 0.0 for r in evaluations[1:])
    best = next(r for r in evaluations if r["step"] == summary["best_step"])
    assert general["forgetting_nats"] == best["forgetting_nats"]
    assert general["nats_after"] - general["nats_before"] == pytest.approx(general["forgetting_nats"])
    assert general["nats_before"] == evaluations[0]["general_nats"]
    assert f"general text {general['forgetting_nats']:+.4f} nats" in capsys.readouterr().out


def test_checkpoint_keeps_the_before_measure_and_resume_reuses_it(tmp_path, monkeypatch):
    from lorakit.train import checkpoint as ckpt
    from lorakit.train import general as tracker_module
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import Trainer, autocast_for

    data = write_classification(tmp_path / "train.csv"), write_classification(tmp_path / "eval.csv", 16, seed=1)
    out = tmp_path / "run"
    assert run(*small(out, *data), "--general-samples", "5") == 0
    state = ckpt.load_latest(out / "checkpoints")["state"]
    base = load_model(BERT, "classify", num_labels=2, seed=0)
    again = measure_general(base, TOKENIZER, shipped_passages(5), max_length=32, batch_size=16,
                            autocast=autocast_for("auto", torch.device("cpu")))
    assert torch.equal(state["general_before"]["embeddings"], again.embeddings)

    def no_measure(*args, **kwargs):
        raise AssertionError("a resumed run measured 'before' again")

    config = TrainConfig(model=BERT, data=str(data[0]), eval_data=str(data[1]), out=str(out), targets="query,value",
                         max_length=32, general_samples=5, resume=True)
    trainer = Trainer(config)
    monkeypatch.setattr(tracker_module, "measure_general", no_measure)
    assert trainer.general.start(state) == {"embedding_cosine": 1.0}
    # A checkpoint with no "before" of these passages: the model has moved, so the measurement turns off.
    other = {"embeddings": state["general_before"]["embeddings"][:4]}
    for stored in (None, other):
        trainer.general.enabled = True
        assert trainer.general.start({**state, "general_before": stored}) == {}
        assert not trainer.general.enabled and trainer.general.summary(state) is None


def test_general_samples_zero_turns_it_off(tmp_path):
    data = write_classification(tmp_path / "train.csv"), write_classification(tmp_path / "eval.csv", 16, seed=1)
    out = tmp_path / "off"
    assert run(*small(out, *data), "--general-samples", "0") == 0
    assert json.loads((out / "summary.json").read_text())["general"] is None
    assert not any("embedding_cosine" in r for r in records(out))


# -- the passages ----------------------------------------------------------------------------------
def test_shipped_sample_is_found_and_ordered():
    passages = shipped_passages()
    assert 250 <= len(passages) <= 400
    assert shipped_passages(10) == passages[:10] and shipped_passages(0) == []
    words = [len(p.split()) for p in passages]
    assert min(words) >= 60 and max(words) <= 200
    assert len(set(passages)) == len(passages)


def test_read_passages_txt_and_jsonl(tmp_path):
    txt = tmp_path / "g.txt"
    txt.write_text("one\ntwo\n\n\nthree\n")
    assert read_passages(txt) == ["one two", "three"]
    jsonl = write_jsonl(tmp_path / "g.jsonl", [{"text": "alpha", "title": "A"}, {"text": "beta"}])
    assert read_passages(jsonl) == ["alpha", "beta"]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "\n\n  \n", "holds no passages"),
    ("empty.jsonl", "", "holds no passages"),
    ("bad.jsonl", '{"text": "fine"}\n{"text": "broken"\n', "bad.jsonl:2: malformed JSON"),
    ("field.jsonl", '{"text": "fine"}\n\n{"body": "no text"}\n', "field.jsonl:3: expected an object"),
    ("other.csv", "text\nx\n", "expected .txt"),
])
def test_read_passages_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(GeneralTextError, match=message):
        read_passages(path)


def test_bad_general_file_stops_training_before_it_writes(tmp_path, capsys):
    data = write_classification(tmp_path / "train.csv")
    out = tmp_path / "never"
    assert run("--model", BERT, "--data", str(data), "--out", str(out), "--general-data",
               str(tmp_path / "nope.txt")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()
