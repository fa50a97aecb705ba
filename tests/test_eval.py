"""`lorakit eval`: flips, KL and metrics against hand-computed cases; parity; gates; run folders."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from test_train import BERT, LLAMA, write_classification, write_jsonl

import lorakit
from lorakit.cli import main
from lorakit.evaluation import regression as R
from lorakit.evaluation import statistics as S
from lorakit.evaluation.gates import crossed, parse_conditions
from lorakit.evaluation.passes import Paired, _causal, _classify, _join
from lorakit.evaluation.sources import EvalSet
from lorakit.train import batches as B


def _paired_from_logits(base: torch.Tensor, adapted: torch.Tensor, labels: torch.Tensor, task: str) -> Paired:
    step = _classify if task == "classify" else _causal
    b, a, kl, units = step(base, adapted, labels)
    return Paired(_join([b], units), _join([a], units), kl, units)


def test_classify_flips_and_kl_match_a_hand_computation():
    # example 0: right → wrong; 1: wrong → right; 2: right, unchanged logits; 3: wrong both times
    base = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 1.0]])
    adapted = torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 0, 0])
    paired = _paired_from_logits(base, adapted, labels, "classify")

    def softmax(row):
        z = [math.exp(v) for v in row]
        return [v / sum(z) for v in z]

    for i in range(4):
        p, q = softmax(base[i].tolist()), softmax(adapted[i].tolist())
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        assert paired.kl[i].item() == pytest.approx(kl, abs=1e-12)
        assert paired.base.prob[i].item() == pytest.approx(p[0], abs=1e-12)
        assert paired.adapted.prob[i].item() == pytest.approx(q[0], abs=1e-12)
    assert paired.kl[2].item() == 0.0
    data = EvalSet("hand", "classify", [B.Encoded([1], 0)] * 4, ["t0", "t1", "t2", "t3"], ["neg"] * 4,
                   ["neg", "pos"])
    keep = R.keep_section(data, paired, {})
    assert (keep["flips_right_to_wrong"], keep["flips_wrong_to_right"]) == (1, 1)
    assert keep["right_to_wrong"][0]["index"] == 0 and keep["right_to_wrong"][0]["adapted_answer"] == "pos"
    assert keep["wrong_to_right"][0]["index"] == 1 and keep["wrong_to_right"][0]["base_answer"] == "pos"
    assert keep["mean_kl"] == pytest.approx(paired.kl.mean().item())
    assert [r["index"] for r in keep["moved_most"]] == torch.argsort(paired.kl, descending=True)[:3].tolist()


def test_causal_exact_match_loss_and_token_kl_match_a_hand_computation():
    """Row 0: prompt 1 token, answer tokens [2, 3]; row 1: answer [1] then padding."""
    vocab = 4
    torch.manual_seed(0)
    base, adapted = torch.randn(2, 3, vocab), torch.randn(2, 3, vocab)
    labels = torch.tensor([[B.IGNORE, 2, 3], [B.IGNORE, 1, B.IGNORE]])
    base[0, 0] = torch.tensor([0.0, 0.0, 5.0, 0.0])  # base predicts 2 then 3: exact match on row 0
    base[0, 1] = torch.tensor([0.0, 0.0, 0.0, 5.0])
    paired = _paired_from_logits(base, adapted, labels, "causal-lm")
    logp_b, logp_a = base.log_softmax(-1).double(), adapted.log_softmax(-1).double()
    positions = {0: [(0, 2), (1, 3)], 1: [(0, 1)]}  # (position whose logits predict, target)
    for row, pairs in positions.items():
        loss_b = -sum(logp_b[row, t, y] for t, y in pairs)
        kl = sum((logp_b[row, t].exp() * (logp_b[row, t] - logp_a[row, t])).sum() for t, _ in pairs)
        assert paired.base.loss_sum[row].item() == pytest.approx(loss_b.item(), abs=1e-6)
        assert paired.kl_sum[row].item() == pytest.approx(kl.item(), abs=1e-6)
        assert paired.units[row].item() == len(pairs)
        exact = all(base[row, t].argmax().item() == y for t, y in pairs)
        assert bool(paired.base.correct[row]) == exact
    assert bool(paired.base.correct[0]) is True
    assert paired.base.prob[0].item() == pytest.approx(math.exp(-paired.base.loss_sum[0].item() / 2))


def test_bootstrap_statistics():
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    # per label F1: 0: p=1/2 r=1/2 → 0.5; 1: p=2/3 r=1 → 0.8; 2: p=1 r=1/2 → 2/3
    f1 = S.macro_f1_of(predicted, truth, 3)(torch.arange(6)).item()
    assert f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    a = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    result = S.paired(S.mean_of(b), S.mean_of(a), 8, 500, seed=3)
    assert result["difference"] == pytest.approx(0.875 - 0.375)
    low, high = result["difference_ci"]
    assert 0 <= low <= result["difference"] <= high <= 1
    assert S.paired(S.mean_of(b), S.mean_of(a), 8, 500, seed=3) == result  # seeded: reproducible
    same = S.paired(S.mean_of(a), S.mean_of(a), 8, 500)
    assert same["difference_ci"] == [0.0, 0.0]


def test_gates_parse_compare_and_name_the_figures_that_exist():
    report = {"keep": {"flips_right_to_wrong": 6}, "general": {"forgetting_nats": 0.05}}
    conditions = parse_conditions("keep.flips_right_to_wrong>5, general.forgetting_nats>0.1")
    assert [str(c) for c, _ in crossed(report, conditions)] == ["keep.flips_right_to_wrong>5"]
    assert crossed(report, parse_conditions("general.forgetting_nats<=0.05"))
    with pytest.raises(lorakit.ConfigError, match=r"did you mean keep\.flips_right_to_wrong"):
        crossed(report, parse_conditions("keep.flip_right_to_wrong>5"))
    with pytest.raises(lorakit.ConfigError, match="cannot read"):
        parse_conditions("keep.flips_right_to_wrong=>5")


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval_classify")
    train = write_classification(folder / "train.csv", 48)
    evaluation = write_classification(folder / "eval.csv", 24, seed=1)
    run = folder / "run"
    assert main(["train", "--quiet", "--model", BERT, "--data", str(train), "--eval-data", str(evaluation),
                 "--out", str(run), "--targets", "query,value", "--max-steps", "6", "--batch-size", "8",
                 "--lr", "1e-2", "--max-length", "32", "--bf16", "off", "--dropout", "0"]) == 0
    return run


def test_eval_of_a_run_folder_reproduces_the_runs_own_numbers(classify_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "--adapter", str(classify_run), "--general", "none", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    summary = json.loads((classify_run / "summary.json").read_text())
    assert report["task"]["base"] == pytest.approx(summary["metric_before"], abs=1e-9)
    assert report["task"]["adapted"] == pytest.approx(summary["metric_after"], abs=1e-9)
    assert report["task"]["base_ci"][0] <= report["task"]["base"] <= report["task"]["base_ci"][1]
    keep = report["keep"]
    assert keep["flips_right_to_wrong"] == len(keep["right_to_wrong"])
    assert keep["base_correct"] - keep["flips_right_to_wrong"] + keep["flips_wrong_to_right"] == \
        keep["adapted_correct"]
    assert keep["adapted_correct"] == round(summary["metric_after"] * keep["examples"])
    assert report["parity"]["max_logit_diff"] < 1e-5
    html = (out / "report.html").read_text()
    assert ("data:image/png;base64," in html and "Right → wrong" in html) or keep["flips_right_to_wrong"] == 0
    assert "# Adapter evaluation" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accuracy" in capsys.readouterr().out


def test_fail_if_exits_non_zero_and_a_typo_fails_before_the_work(classify_run, tmp_path, capsys):
    out = tmp_path / "gated"
    args = ["eval", "--adapter", str(classify_run / "adapter"), "--model", BERT, "--data",
            str(classify_run.parent / "eval.csv"), "--general", "none", "--quiet", "--out", str(out)]
    assert main([*args, "--fail-if", "keep.examples>=1"]) == 1
    assert "fail: keep.examples>=1" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["gates"]["crossed"][0]["value"] == 24
    assert main([*args, "--fail-if", "keep.examples>1000"]) == 0
    assert main([*args, "--fail-if", "keep.exampels>1"]) == 2
    assert "did you mean keep.examples" in capsys.readouterr().err


def test_a_zero_adapter_changes_nothing_and_merges_exactly(tmp_path):
    """B = 0: no flips, zero KL, zero task difference, parity exactly 0."""
    base = lorakit.train.models.load_model(LLAMA, "causal-lm", seed=0)
    adapted = lorakit.adapt(base, lorakit.AdapterConfig(r=4, target_modules=("q_proj", "v_proj")))
    lorakit.save_adapter(adapted, tmp_path / "zero")
    rng = random.Random(0)
    data = write_jsonl(tmp_path / "task.jsonl", [{"prompt": f"q{rng.randint(0, 9)}", "completion": " a"}
                                                 for _ in range(10)])
    out = tmp_path / "report"
    assert main(["eval", "--adapter", str(tmp_path / "zero"), "--model", LLAMA, "--task", "causal-lm", "--data",
                 str(data), "--general-samples", "6", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["difference"] == 0.0 and report["task"]["token_loss"]["difference"] == 0.0
    assert report["keep"]["mean_kl"] == 0.0 and report["keep"]["flips_right_to_wrong"] == 0
    assert report["parity"]["max_logit_diff"] == 0.0
    assert report["general"]["forgetting_nats"] == 0.0 and report["general"]["passages"] == 6


def test_general_text_forgetting_of_a_trained_encoder_adapter(classify_run, tmp_path):
    """An encoder reports the drift of its pooled embeddings; a user's file replaces the shipped sample."""
    general = tmp_path / "general.txt"
    general.write_text("The river flows north.\n\nA second passage about cities.\n\nThird one, on music.\n")
    out = tmp_path / "report"
    assert main(["eval", "--adapter", str(classify_run), "--general", str(general), "--quiet", "--out",
                 str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["general"]["passages"] == 3 and report["general"]["forgetting_nats"] is None
    assert 0.0 < report["general"]["embedding_drift"] == pytest.approx(1 - report["general"]["embedding_cosine"])


def test_combination_is_scored_on_each_constituents_task(tmp_path):
    runs = []
    for k, word in enumerate(["cat", "owl"]):
        data = write_jsonl(tmp_path / f"{word}.jsonl", [{"prompt": f"say {i}:", "completion": f" {word}"}
                                                        for i in range(24)])
        run = tmp_path / word
        assert main(["train", "--quiet", "--task", "causal-lm", "--model", LLAMA, "--data", str(data), "--out",
                     str(run), "--max-steps", "8", "--batch-size", "8", "--lr", "3e-2", "--max-length", "32",
                     "--bf16", "off", "--seed", "0", "--dropout", "0", "--eval-every", "4"]) == 0
        runs.append(run)
        assert k == len(runs) - 1
    out = tmp_path / "report"
    assert main(["eval", "--adapter", str(runs[0]), "--adapter", str(runs[1]), "--combine", "linear", "--weights",
                 "0.5,0.5", "--general", "none", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["shipped"] == "combined" and set(report["candidates"]) == {"cat", "owl", "combined"}
    combined = report["candidates"]["combined"]
    assert set(combined["tasks"]) == {"cat", "owl"}
    for name in ("cat", "owl"):
        alone = report["candidates"][name]["task"]
        assert combined["tasks"][name]["constituent_alone"] == alone["adapted"]
        assert combined["tasks"][name]["base"] == alone["base"]
        # the combination at half weight moves the loss less than the adapter alone
        assert combined["tasks"][name]["token_loss"]["adapted"] > alone["token_loss"]["adapted"]
    assert combined["parity"]["max_logit_diff"] < 1e-5


def test_a_run_folder_works_wherever_an_adapter_folder_does(classify_run, tmp_path, capsys):
    assert lorakit.read_adapter(classify_run).source == str(classify_run / "adapter")
    merged = tmp_path / "merged"
    assert main(["merge", "--model", BERT, "--adapter", str(classify_run), "--out", str(merged)]) == 2
    assert "random architecture" in capsys.readouterr().err  # got past reading the run folder
    baseline = tmp_path / "head_run"
    baseline.mkdir()
    (baseline / "summary.json").write_text("{}")
    (baseline / "model").mkdir()
    (baseline / "model" / "config.json").write_text("{}")
    with pytest.raises(lorakit.AdapterFileError, match="whole-model baseline"):
        lorakit.read_adapter(baseline)
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(lorakit.AdapterFileError, match="--resume"):
        lorakit.read_adapter(unfinished)


def test_greedy_answers_of_left_padded_batches_equal_one_prompt_at_a_time(tmp_path):
    from lorakit.evaluation.passes import greedy_answers
    from lorakit.evaluation.sources import Reading, load_eval_set
    from lorakit.train.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(LLAMA)
    config = lorakit.AdapterConfig(r=2, target_modules="all-linear")
    model = lorakit.adapt(load_model(LLAMA, "causal-lm", seed=0), config)
    rows = [{"prompt": "ab" * k, "completion": "xyz"[:k % 3 + 1]} for k in range(1, 6)]
    data = load_eval_set(str(write_jsonl(tmp_path / "rows.jsonl", rows)), Reading("causal-lm", tokenizer, 64, None))
    indices = list(range(len(data)))
    cpu = torch.device("cpu")
    together = greedy_answers(model, "default", data, indices, tokenizer, device=cpu, batch_size=5)
    alone = [greedy_answers(model, "default", data, [i], tokenizer, device=cpu)[0] for i in indices]
    assert together == alone
    assert all(together)  # every prompt got an answer


def test_parity_on_a_quantised_base_is_measured_against_the_dequantised_merge(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lorakit.quantize import quantize_model
    from lorakit.train.models import load_model

    base = quantize_model(load_model(LLAMA, "causal-lm", seed=0), "nf4")
    adapted = lorakit.adapt(base, lorakit.AdapterConfig(r=4, target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        for module in adapted.adapter_modules("default").values():
            module.lora_B.normal_(0, 0.5)
    lorakit.save_adapter(adapted, tmp_path / "qlora", extra_metadata={"quantize": "nf4", "task": "causal-lm"})
    data = write_jsonl(tmp_path / "task.jsonl", [{"prompt": f"q{i}", "completion": " a"} for i in range(6)])
    out = tmp_path / "report"
    assert main(["eval", "--adapter", str(tmp_path / "qlora"), "--model", LLAMA, "--data", str(data),
                 "--general", "none", "--quiet", "--out", str(out)]) == 0
    parity = json.loads((out / "report.json").read_text())["parity"]
    assert parity["quantized_base"] is True and "dequantised" in parity["note"]
    assert 0 < parity["max_logit_diff"] < 1e-3


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_parity_leaves_the_model_exactly_as_it_was(quantize):
    from lorakit.evaluation.parity import parity
    from lorakit.train.models import load_model

    base = load_model(LLAMA, "causal-lm", seed=0)
    if quantize:
        pytest.importorskip("bitsandbytes")
        from lorakit.quantize import quantize_model

        base = quantize_model(base, quantize)
    adapted = lorakit.adapt(base, lorakit.AdapterConfig(method="dora", r=4, target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        for module in adapted.adapter_modules("default").values():
            module.lora_B.normal_(0, 0.5)
    batch = {"input_ids": torch.randint(3, 200, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        before = adapted(**batch).logits
        with adapted.base_only():
            bare = adapted(**batch).logits
    result = parity(adapted, "default", batch)
    assert result["max_logit_diff"] < (1e-3 if quantize else 1e-5)
    with torch.no_grad():
        assert torch.equal(adapted(**batch).logits, before)
        with adapted.base_only():
            assert torch.equal(adapted(**batch).logits, bare)
    assert all(not layer.merged for layer in adapted.adapted_layers().values())


def test_several_keep_files_add_up_and_each_is_kept(classify_run, tmp_path):
    first = write_classification(tmp_path / "keep1.csv", 12, seed=5)
    second = write_classification(tmp_path / "keep2.csv", 10, seed=6)
    out = tmp_path / "report"
    assert main(["eval", "--adapter", str(classify_run), "--keep", str(first), "--keep", str(second),
                 "--general", "none", "--quiet", "--out", str(out)]) == 0
    keep = json.loads((out / "report.json").read_text())["keep"]
    assert [f["examples"] for f in keep["files"]] == [12, 10] and keep["examples"] == 22
    for key in ("base_correct", "adapted_correct", "flips_right_to_wrong", "flips_wrong_to_right"):
        assert keep[key] == sum(f[key] for f in keep["files"])
    assert keep["mean_kl"] == pytest.approx(sum(f["mean_kl"] * f["examples"] for f in keep["files"]) / 22)
    assert len(keep["right_to_wrong"]) == keep["flips_right_to_wrong"]


def test_warnings_name_a_constant_prediction_a_noise_level_change_and_a_rewritten_encoder():
    from lorakit.evaluation.diagnose import warnings_for

    # the adapter says "pos" for every example; 3 of 4 references are "pos"
    base = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    adapted = torch.tensor([[0.0, 3.0]] * 4)
    paired = _paired_from_logits(base, adapted, torch.tensor([1, 1, 1, 0]), "classify")
    data = EvalSet("hand", "classify", [B.Encoded([1], 1)] * 4, ["t"] * 4, ["pos", "pos", "pos", "neg"],
                   ["neg", "pos"])
    section = {"task": R.task_section(data, paired, 200), "keep": R.keep_section(data, paired, {}),
               "general": {"embedding_cosine": 0.1}, "parity": {"max_logit_diff": 0.0}}
    found = warnings_for("x", data, paired, section)
    assert any("predicts 'pos' for 4 of 4" in w and "75.0%" in w for w in found)
    assert any("rewrote the encoder" in w for w in found)
    assert any("1 of the 2 keep examples" in w for w in found)
    section["general"], section["keep"]["flips_right_to_wrong"] = {"embedding_cosine": 0.99}, 0
    assert not any("encoder" in w or "keep examples" in w for w in warnings_for("x", data, paired, section))


def test_a_base_mismatch_names_the_command_line_flag(classify_run, tmp_path, capsys):
    args = ["eval", "--adapter", str(classify_run / "adapter"), "--model", BERT, "--seed", "1", "--data",
            str(classify_run.parent / "eval.csv"), "--general", "none", "--quiet", "--out", str(tmp_path / "r")]
    assert main(args) == 2  # seed 1 draws another random base than the adapter was trained on
    err = capsys.readouterr().err
    assert "--ignore-fingerprint" in err and "check_fingerprint" not in err
    assert main([*args, "--ignore-fingerprint"]) == 0


def test_json_answers_report_the_share_that_parses_before_and_after(tmp_path, monkeypatch):
    """References that are all JSON add a valid-JSON figure, from greedy answers of the examples
    that are not exact matches; the base's answers are generated once, not per candidate."""
    import lorakit.evaluation.run as run
    from lorakit.evaluation.formats import reference_format, valid_json

    assert reference_format(['{"a": 1}', "[1, 2]"]) == "json"
    assert reference_format(['{"a": 1}', "plain"]) is None and reference_format(["1"]) is None
    assert valid_json('{"drug": "x"}') and not valid_json('{"drug": ') and not valid_json('"text"')
    base = lorakit.train.models.load_model(LLAMA, "causal-lm", seed=0)
    adapted = lorakit.adapt(base, lorakit.AdapterConfig(r=4, target_modules=("q_proj", "v_proj")))
    lorakit.save_adapter(adapted, tmp_path / "zero")
    rows = [{"prompt": f"review {i}", "completion": json.dumps({"n": i})} for i in range(10)]
    data = write_jsonl(tmp_path / "task.jsonl", rows)
    generated = []

    def canned(model, name, data, indices, tokenizer, **kwargs):
        generated.append((name, len(indices)))
        if name is None:
            return ["Sure! Here is the JSON you asked for"] * len(indices)
        return ['{"n": 0}' if i else '{"n": ' for i in indices]

    monkeypatch.setattr(run, "greedy_answers", canned)
    out = tmp_path / "report"
    assert main(["eval", "--adapter", str(tmp_path / "zero"), "--model", LLAMA, "--task", "causal-lm", "--data",
                 str(data), "--general", "none", "--keep", str(data), "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    figure = report["task"]["valid_json"]
    assert (figure["base"], figure["adapted"]) == (0.0, 0.9) and figure["difference_ci"][0] <= 0.9
    assert "valid JSON 0.0% → 90.0%" in (out / "report.md").read_text()
    assert [name for name, _ in generated if name is None].count(None) == 2  # keep listing + valid JSON, once
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "q", "completion": " a"}] * 4)
    assert main(["eval", "--adapter", str(tmp_path / "zero"), "--model", LLAMA, "--task", "causal-lm", "--data",
                 str(plain), "--general", "none", "--quiet", "--out", str(tmp_path / "plain")]) == 0
    assert "valid_json" not in json.loads((tmp_path / "plain" / "report.json").read_text())["task"]
