"""`lorakit train --data a.jsonl:0.7,b.jsonl:0.3`: sources drawn in proportion, reproducibly, counted in the summary."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.train.data import DataError, held_out_rows, mix_rows, parse_mix

BERT = "random:bert,hidden=32,layers=1,heads=2,intermediate=64"


def write_source(path: Path, n: int, word: str) -> Path:
    """``n`` rows whose text names the source and the row, so a drawn row tells where it came from."""
    rows = [{"text": f"{word} {i} {'good' if i % 2 else 'bad'}", "label": "good" if i % 2 else "bad"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sources(tmp_path) -> tuple[Path, Path]:
    return write_source(tmp_path / "a.jsonl", 40, "alpha"), write_source(tmp_path / "b.jsonl", 60, "beta")


def origin(row: dict) -> str:
    return row["text"].split()[0]


def test_proportions_are_the_weights_and_sizes_add_up(sources):
    a, b = sources
    mix = parse_mix(f"{a}:0.7,{b}:0.3")
    mixed = mix_rows(mix, seed=0, eval_split=None)
    drawn = Counter(origin(r) for r in mixed.train)
    assert len(mixed.train) == 100  # as many as the sources hold together
    assert abs(drawn["alpha"] / 100 - 0.7) <= 0.01 and abs(drawn["beta"] / 100 - 0.3) <= 0.01
    assert [s["drawn"] for s in mixed.sources] == [drawn["alpha"], drawn["beta"]]
    # 70 from a source of 40: every row once, then 30 of them again, never a row three times
    per_row = Counter(r["text"] for r in mixed.train if origin(r) == "alpha")
    assert len(per_row) == 40 and set(per_row.values()) == {1, 2}
    # 30 from a source of 60: no row twice
    assert max(Counter(r["text"] for r in mixed.train if origin(r) == "beta").values()) == 1


def test_weights_need_not_sum_to_one_and_uneven_weights_round_to_the_total(sources):
    a, b = sources
    mix = parse_mix(f"{a}:2,{b}:1")
    assert [round(s.weight, 6) for s in mix] == [0.666667, 0.333333]
    mixed = mix_rows(mix, seed=3, eval_split=None)
    assert [s["drawn"] for s in mixed.sources] == [67, 33]


def test_same_seed_same_mix_other_seed_other_mix(sources):
    a, b = sources
    mix = parse_mix(f"{a}:0.5,{b}:0.5")
    first, again = mix_rows(mix, 1, 0.1), mix_rows(mix, 1, 0.1)
    assert [r["text"] for r in first.train] == [r["text"] for r in again.train]
    other = mix_rows(mix, 2, 0.1)
    assert [r["text"] for r in first.train] != [r["text"] for r in other.train]


def test_each_source_is_split_for_evaluation_as_a_single_file_is(sources):
    a, b = sources
    mixed = mix_rows(parse_mix(f"{a}:0.5,{b}:0.5"), seed=0, eval_split=0.1)
    held = Counter(origin(r) for r in mixed.held_out)
    assert held == {"alpha": 4, "beta": 6}
    assert not {r["text"] for r in mixed.held_out} & {r["text"] for r in mixed.train}
    assert [(s["rows"], s["held_out"]) for s in mixed.sources] == [(36, 4), (54, 6)]
    # `lorakit eval` draws the same held-out rows again from the run's --data and seed
    rows, name = held_out_rows(f"{a}:0.5,{b}:0.5", 0, 0.1)
    assert [r["text"] for r in rows] == [r["text"] for r in mixed.held_out] and "held-out" in name


def test_train_reports_per_source_counts(tmp_path, sources):
    a, b = sources
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--model", BERT, "--data", f"{a}:0.25,{b}:0.75", "--out", str(out),
                 "--targets", "query,value", "--max-steps", "2", "--max-length", "16", "--threads", "1",
                 "--general-samples", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["sources"] == [
        {"path": str(a), "weight": 0.25, "rows": 36, "drawn": 23, "held_out": 4},
        {"path": str(b), "weight": 0.75, "rows": 54, "drawn": 67, "held_out": 6},
    ]
    assert summary["data"]["train"]["examples"] == 90 and summary["data"]["eval"]["examples"] == 10
    # `lorakit eval` evaluates the run on the same held-out rows by default
    assert main(["eval", "--adapter", str(out), "--out", str(tmp_path / "eval"), "--general", "none",
                 "--bootstrap", "10", "--quiet", "--threads", "1"]) == 0
    task = json.loads((tmp_path / "eval" / "report.json").read_text())["task"]
    assert task["examples"] == 10 and "held-out splits" in task["source"]


def test_a_plain_file_name_is_not_a_mix():
    assert parse_mix("data.jsonl") is None
    assert parse_mix("runs:v2/data.csv") is None
    assert parse_mix("a,b.csv") is None


@pytest.mark.parametrize(("spec", "says"), [
    ("{a}:0.7,{tmp}/nothere.jsonl:0.3", "nothere.jsonl does not exist"),
    ("{a}:0,{b}:1", "must be a positive number, got '0'"),
    ("{a}:-0.5,{b}:1", "must be a positive number"),
    ("{a}:nan,{b}:1", "must be a positive number"),
    ("{a}:0.7,{b}", "needs a weight"),
    ("{a}:0.5,{a}:0.5", "appears more than once"),
    ("default:0.5,{a}:0.5", "cannot be part of a mix"),
])
def test_bad_mixes_fail_before_any_work(tmp_path, sources, capsys, spec, says):
    a, b = sources
    spec = spec.format(a=a, b=b, tmp=tmp_path)
    with pytest.raises(DataError, match=says.replace("(", r"\(")):
        parse_mix(spec)
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--model", BERT, "--data", spec, "--out", str(out)]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()
