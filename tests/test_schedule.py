"""The lr schedules of `lorakit train` (--scheduler constant|linear|cosine with --warmup-ratio):
the factor at chosen steps, the lr a run logs, and a resumed run that keeps its schedule."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from test_train import BERT, write_classification

import lorakit
from lorakit.train.config import TrainConfig
from lorakit.train.loop import Trainer, lr_factor

TOTAL, WARMUP = 110, 10  # after warmup, step 10 + k is at progress k / 100


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_is_linear_to_one_for_every_schedule(schedule):
    assert lr_factor(0, TOTAL, WARMUP, schedule) == pytest.approx(0.1)
    assert lr_factor(4, TOTAL, WARMUP, schedule) == pytest.approx(0.5)
    assert lr_factor(9, TOTAL, WARMUP, schedule) == pytest.approx(1.0)
    assert lr_factor(10, TOTAL, WARMUP, schedule) == pytest.approx(1.0)  # the first step after warmup: full lr


@pytest.mark.parametrize(("schedule", "expected"), [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.75, 0.5, 0.01, 0.0]),
    ("cosine", [0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(math.pi * 0.99)), 0.0]),
])
def test_factor_after_warmup(schedule, expected):
    steps = [35, 60, 109, 110]  # progress 0.25, 0.5, 0.99 (the last step trained), 1.0
    got = [lr_factor(s, TOTAL, WARMUP, schedule) for s in steps]
    assert got == pytest.approx(expected)


def test_without_warmup_the_first_step_has_the_full_lr():
    assert lr_factor(0, 100, 0, "linear") == 1.0
    assert lr_factor(50, 100, 0, "linear") == pytest.approx(0.5)


def test_unknown_scheduler_and_bad_warmup_are_refused():
    with pytest.raises(lorakit.ConfigError, match="--scheduler"):
        TrainConfig(scheduler="step")
    with pytest.raises(lorakit.ConfigError, match="--warmup-ratio"):
        TrainConfig(warmup_ratio=1.0)


def config_for(tmp_path: Path, out: str, schedule: str, steps: int = 8) -> TrainConfig:
    train = write_classification(tmp_path / "train.csv", 40)
    evaluation = write_classification(tmp_path / "eval.csv", 8, seed=1)
    return TrainConfig(model=BERT, data=str(train), eval_data=str(evaluation), out=str(tmp_path / out),
                       targets="query,value", batch_size=8, max_steps=steps, eval_every=4, max_length=32,
                       lr=1e-2, scheduler=schedule, warmup_ratio=0.25, quiet=True, threads=1)


def logged_lrs(out: str | Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if "lr" in r}


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_a_run_logs_the_lr_of_its_schedule(tmp_path, schedule):
    config = config_for(tmp_path, "run", schedule)
    Trainer(config).run()
    # The lr logged after step k is the one step k + 1 will use (the scheduler has stepped).
    want = {k: 1e-2 * lr_factor(k, 8, 2, schedule) for k in range(1, 9)}
    assert logged_lrs(config.out) == pytest.approx(want)


def test_a_resumed_run_keeps_the_schedule(tmp_path):
    reference = config_for(tmp_path, "reference", "linear")
    Trainer(reference).run()
    config = config_for(tmp_path, "resumed", "linear")
    first = Trainer(config)
    first.outputs.start(config, resumed_step=None)
    for _ in range(3):  # stop after step 3, as a killed run would, with a checkpoint of that step
        first.train_step()
    first._checkpoint()
    Trainer(dataclasses.replace(config, resume=True)).run()
    got, want = logged_lrs(config.out), logged_lrs(reference.out)
    assert set(got) == set(range(4, 9))
    assert got == pytest.approx({k: want[k] for k in got})


def test_resuming_under_another_schedule_is_refused(tmp_path):
    config = config_for(tmp_path, "run", "linear")
    first = Trainer(config)
    first.outputs.start(config, resumed_step=None)
    first.train_step()
    first._checkpoint()
    with pytest.raises(lorakit.ConfigError, match="--scheduler linear"):
        Trainer(dataclasses.replace(config, resume=True, scheduler="constant")).run()


def evaluations(out: str | Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["accuracy"] for r in records if "accuracy" in r}


@pytest.mark.parametrize("select", ["last", "best"])
def test_select_chooses_the_evaluation_whose_adapter_is_saved(tmp_path, select):
    config = dataclasses.replace(config_for(tmp_path, select, "constant", steps=12), eval_every=2, select=select)
    summary = Trainer(config).run()
    scores = {k: v for k, v in evaluations(config.out).items() if k > 0}
    if select == "last":
        assert summary["best_step"] == 12 and summary["metric_after"] == scores[12]
    else:  # the first of the highest evaluations
        assert summary["metric_after"] == max(scores.values())
        assert summary["best_step"] == min(k for k, v in scores.items() if v == max(scores.values()))


def test_early_stopping_counts_from_the_best_evaluation_under_select_last(tmp_path):
    config = dataclasses.replace(config_for(tmp_path, "run", "constant", steps=40), eval_every=1, early_stopping=2,
                                 lr=1e-6)  # too small an lr to change the answers: no evaluation improves
    summary = Trainer(config).run()
    assert summary["steps"] == 3 and summary["best_step"] == 3  # stopped after 2 evaluations without a gain


def test_max_length_is_capped_at_the_tokenizers_limit():
    from lorakit.train.batches import choose_length

    def max_length(config, tokenizer):
        return choose_length([10, 20], config.max_length, tokenizer).tokens

    class Limited:
        model_max_length = 64

    class Unlimited:
        model_max_length = int(1e30)

    assert max_length(TrainConfig(max_length=512), Limited()) == 64
    assert max_length(TrainConfig(max_length=32), Limited()) == 32
    assert max_length(TrainConfig(max_length=512), Unlimited()) == 512
    assert max_length(TrainConfig(max_length=512), object()) == 512


def test_train_help_lists_the_new_flags(capsys):
    from lorakit.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--scheduler" in text and "--select" in text and "(default: constant)" in text


def test_the_causal_lm_loss_is_transformers_own_on_the_same_labels():
    """batch_loss shifts the labels (not the logits): the sum and count give transformers' mean loss."""
    import torch

    from lorakit.train.batches import IGNORE
    from lorakit.train.loop import batch_loss
    from lorakit.train.models import load_model

    model = load_model("random:llama,hidden=32,layers=1,heads=2,kv_heads=2,intermediate=64", "causal-lm", seed=0)
    ids = torch.randint(3, 259, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = IGNORE  # a prompt that carries no loss
    labels[1, 5:] = IGNORE  # padding
    mask = torch.ones_like(ids)
    total, units = batch_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert units == (labels[:, 1:] != IGNORE).sum().item() == 4 + 4
    torch.testing.assert_close(total / units, expected, rtol=1e-6, atol=1e-6)


def test_the_training_loss_of_a_causal_lm_keeps_no_kv_cache():
    """A cache would hold every layer's keys and values until the loss is computed (memory for nothing)."""
    from model_zoo import tiny_llama

    from lorakit.train.loop import batch_loss

    model = tiny_llama()
    assert model.config.use_cache  # transformers' default: the loss path must turn it off itself
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(out.past_key_values))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    loss, units = batch_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    assert seen == [None] and units == 14 and loss.item() > 0
