"""`lorakit sweep`: the search space, the study and its workers, resuming, and what a sweep writes."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.sweep.spec import spec_from_dict
from lorakit.sweep.study import with_driver

optuna = pytest.importorskip("optuna")

BERT = "random:bert,hidden=32,layers=1,heads=2,intermediate=64"


def write_task(path: Path, n: int, seed: int) -> Path:
    """A learnable toy task: the label is written in the text."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(n):
        label = rng.choice(["good", "bad"])
        filler = " ".join(rng.choice("abcd") for _ in range(rng.randint(2, 6)))
        lines.append(f"{filler} {label} {filler},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def task(tmp_path) -> dict[str, str]:
    """A base config: a tiny random BERT on the toy task; a trial takes about a second."""
    train, held = write_task(tmp_path / "train.csv", 48, 0), write_task(tmp_path / "eval.csv", 24, 1)
    return {"model": BERT, "data": str(train), "eval_data": str(held), "batch_size": 8, "max_steps": 6,
            "eval_every": 3, "max_length": 24, "general_samples": 0}


def write_sweep(folder: Path, base: dict, search: dict, **extra) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": base, "search": search, **extra}, sort_keys=False))
    return path


def study_of(out: Path, name: str = "lorakit-sweep"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def leaderboard(out: Path) -> list[dict[str, str]]:
    with (out / "leaderboard.csv").open() as f:
        return list(csv.DictReader(f))


# -- the search space ------------------------------------------------------------------------------
def test_space_reads_choices_ranges_named_sets_and_mixes(tmp_path, task):
    a, b = (tmp_path / "a.csv", tmp_path / "b.csv")
    a.write_text("text,label\nx,1\n")
    b.write_text("text,label\ny,0\n")
    spec = spec_from_dict({"base": task, "search": {
        "rank": [4, 8, 16], "lr": {"low": "1e-4", "high": 3e-3, "log": True}, "alpha_over_rank": [1, 2],
        "targets": {"qv": "query,value", "all": "all-linear", "qk": ["query", "key"]},
        "data_mix": {str(a): {"low": 0.2, "high": 0.8}, str(b): 0.5}}})
    space = spec.space
    assert space.names == ["rank", "lr", "alpha_over_rank", "targets", f"data_mix:{a}", f"data_mix:{b}"]
    assert space.params[1].low == 1e-4 and space.params[1].log  # YAML's 1e-4 (text) read as the number
    settings = space.settings({"rank": 8, "lr": 1e-3, "alpha_over_rank": 2, "targets": "qk",
                               f"data_mix:{a}": 0.75, f"data_mix:{b}": 0.5}, spec.base)
    assert settings == {"rank": 8, "lr": 1e-3, "alpha": 16.0, "targets": "query,key", "data": f"{a}:0.6,{b}:0.4"}
    assert spec.trials == 10 and spec.directions() == ["maximize"] and spec.pruner == {"type": "median"}


@pytest.mark.parametrize(("search", "extra", "says"), [
    ({"rnak": [4, 8]}, {}, "'rnak' (did you mean 'rank'?)"),
    ({"learning_rate": [1e-3]}, {}, "'learning_rate' (did you mean 'lr'?)"),
    ({"rank": []}, {}, "rank: the list of choices is empty"),
    ({"lr": {"low": 1e-2, "high": 1e-3}}, {}, "lr: low (0.01) must be below high (0.001)"),
    ({"lr": {"low": 1e-3, "high": 1e-3}}, {}, "must be below high"),
    ({"lr": {"low": 0, "high": 1e-3, "log": True}}, {}, "a log range needs low above 0"),
    ({"lr": {"low": 1e-4, "hgih": 1e-3}}, {}, "'hgih' (did you mean 'high'?)"),
    ({"rank": {"low": 2.5, "high": 8}}, {}, "rank is a whole number"),
    ({"method": ["lora", "lorra"]}, {}, "method: 'lorra': --method must be one of"),
    ({"out": ["a", "b"]}, {}, "out cannot be searched"),
    ({"rank": 8}, {}, "a fixed value belongs in base"),
    ({"alpha": [8, 16], "alpha_over_rank": [1, 2]}, {}, "not both"),
    ({"data_mix": {"nothere.jsonl": 0.5}}, {}, "nothere.jsonl does not exist"),
    ({"rank": [4, 8]}, {"serach": {}}, "'serach' (did you mean 'search'?)"),
    ({"rank": [4, 8]}, {"objectives": "metric,forgeting"}, "'forgeting' (did you mean 'forgetting'?)"),
    ({"rank": [4, 8]}, {"objectives": "metric,forgetting"}, "general_samples is 0"),
    ({"lr": {"low": 1e-4, "high": 1e-3}}, {"sampler": "grid"}, "lr is a range without a step"),
    ({"rank": [4, 8]}, {"pruner": {"type": "threshold"}}, "threshold needs lower"),
    ({"rank": [4, 8]}, {"pruner": "median", "objectives": ["metric", "params"]}, "use pruner: none"),
])
def test_a_bad_space_fails_before_any_trial(task, search, extra, says):
    with pytest.raises(ConfigError) as error:
        spec_from_dict({"base": task, "search": search, **extra})
    assert says in str(error.value)


def test_a_typo_in_base_gets_a_guess_and_the_command_writes_nothing(tmp_path, task, capsys):
    config = write_sweep(tmp_path, {**task, "lora_r": 8}, {"rank": [4, 8]})
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--out", str(out)]) == 2
    assert "'lora_r' (did you mean 'rank'?)" in capsys.readouterr().err
    assert not out.exists()


# -- a sweep, its outputs, and best.yaml -----------------------------------------------------------
def test_sweep_writes_a_leaderboard_and_best_yaml_reproduces_the_best_trial(tmp_path, task, capsys):
    config = write_sweep(tmp_path, task, {"rank": [2, 8], "lr": {"low": 1e-3, "high": 3e-2, "log": True},
                                          "targets": ["query,value", "all-linear"]}, trials=4)
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert [line.split()[:3] for line in printed.splitlines() if line.startswith("trial ")] == [
        ["trial", str(n), "complete"] for n in range(4)]
    table = leaderboard(out)
    assert [row["number"] for row in table] == ["0", "1", "2", "3"]
    assert {"rank", "lr", "targets", "accuracy", "trainable_params", "adapter_bytes", "seconds", "state"} <= set(
        table[0])
    assert all(row["state"] == "complete" and Path(row["folder"], "summary.json").is_file() for row in table)
    assert "saved: the evaluation of step 6" in Path(table[0]["folder"], "train.log").read_text()
    assert "saved:" not in printed  # the runs' own lines went to their train.log
    best = max(table, key=lambda r: (float(r["accuracy"]), -int(r["trainable_params"]), -int(r["number"])))
    assert (out / "leaderboard.md").read_text().count("\n| ") == 5 and (out / "pareto.png").stat().st_size > 0
    assert f"best: trial {best['number']} " in printed and str(out / "best.yaml") in printed

    best_yaml = out / "best.yaml"
    assert yaml.safe_load(best_yaml.read_text())["out"] == str(out / "best")
    assert main(["train", "--config", str(best_yaml)]) == 0
    again = json.loads((out / "best" / "summary.json").read_text())
    trial = json.loads(Path(best["folder"], "summary.json").read_text())
    assert again["metric_after"] == trial["metric_after"] == float(best["accuracy"])
    a = load_file(out / "best" / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(best["folder"]) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grid_sampler_tries_each_point_once(tmp_path, task, capsys):
    config = write_sweep(tmp_path, {**task, "max_steps": 2, "eval_every": 2},
                         {"rank": [2, 4], "targets": ["query", "value"]}, sampler="grid")
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--trials", "9", "--threads", "1"]) == 0
    assert "the grid has 4 points: 4 trials, not 9" in capsys.readouterr().out
    points = sorted((row["rank"], row["targets"]) for row in leaderboard(out))
    assert points == [("2", "query"), ("2", "value"), ("4", "query"), ("4", "value")]


def test_a_trial_that_errors_is_recorded_and_the_sweep_goes_on(tmp_path, task, capsys):
    config = write_sweep(tmp_path, {**task, "max_steps": 2, "eval_every": 2},
                         {"targets": ["no_such_module", "query"]}, sampler="grid")
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--threads", "1"]) == 0
    rows = {row["targets"]: row for row in leaderboard(out)}
    assert rows["query"]["state"] == "complete" and rows["no_such_module"]["state"] == "failed"
    assert "no_such_module" in rows["no_such_module"]["note"]
    printed = capsys.readouterr().out
    assert "sweep: 1 completed, 0 pruned, 1 failed of 2 trials" in printed
    assert yaml.safe_load((out / "best.yaml").read_text())["targets"] == "query"


def test_pruned_trials_stop_training_at_the_evaluation_that_pruned_them(tmp_path, task, capsys):
    config = write_sweep(tmp_path, task, {"rank": [2, 4]}, trials=2, pruner={"type": "threshold", "lower": 1.01})
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--threads", "1"]) == 0
    table = leaderboard(out)
    assert [row["state"] for row in table] == ["pruned", "pruned"]
    assert all(row["note"].startswith("pruned at step 3") for row in table)
    steps = [json.loads(line)["step"] for line in Path(table[0]["folder"], "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3  # of 6: training ended at the first evaluation
    assert "no trial completed" in capsys.readouterr().out and not (out / "best.yaml").exists()
    # the last evaluation ends the training anyway: a trial is never pruned there, its result is kept
    config = write_sweep(tmp_path, {**task, "eval_every": 6}, {"rank": [2, 4]}, trials=1,
                         pruner={"type": "threshold", "lower": 1.01})
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "last"), "--threads", "1"]) == 0
    assert [row["state"] for row in leaderboard(tmp_path / "last")] == ["complete"]


def test_multi_objective_sweep_reports_its_pareto_front_and_mixes_data(tmp_path, task, capsys):
    a = write_task(tmp_path / "a.csv", 32, 2)
    b = write_task(tmp_path / "b.csv", 32, 3)
    base = {**task, "general_samples": 4}
    del base["data"]
    config = write_sweep(tmp_path, base, {"rank": [2, 8], "targets": ["query", "query,value,key"],
                                          "data_mix": {str(a): {"low": 0.2, "high": 0.8}, str(b): 0.5}},
                         trials=4, objectives="metric,forgetting,params")
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--threads", "1"]) == 0
    assert len(study_of(out).directions) == 3
    table = leaderboard(out)
    points = {row["number"]: (-float(row["accuracy"]), float(row["forgetting"]), int(row["trainable_params"]))
              for row in table}
    expected = {n for n, p in points.items()
                if not any(all(o <= m for o, m in zip(q, p, strict=True)) and q != p for q in points.values())}
    assert {row["number"] for row in table if row["pareto"] == "True"} == expected and expected
    assert f"Pareto front (metric, forgetting, params): trials {', '.join(sorted(expected, key=int))}" in (
        capsys.readouterr().out)
    summary = json.loads(Path(table[0]["folder"], "summary.json").read_text())
    drawn = [s["path"] for s in summary["data"]["sources"]]
    assert drawn == [str(a), str(b)] and summary["data"]["train"]["examples"] == 64


# -- several workers, shared storage, resuming ----------------------------------------------------
def test_two_worker_processes_share_one_sqlite_study(tmp_path, task):
    config = write_sweep(tmp_path, task, {"rank": [2, 4, 8], "lr": {"low": 1e-3, "high": 3e-2, "log": True}})
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--trials", "4", "--workers", "2"]) == 0
    trials = [t for t in study_of(out).trials if not t.user_attrs.get("surplus")]
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 4
    assert len({t.number for t in trials}) == 4
    assert len({t.user_attrs["folder"] for t in trials}) == 4
    workers = {t.user_attrs["worker"]["pid"] for t in trials}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2  # trials ran in the worker processes
    assert all(t.user_attrs["config"]["threads"] == max(1, len(os.sched_getaffinity(0)) // 2) for t in trials)
    assert [row["number"] for row in leaderboard(out)] == ["0", "1", "2", "3"]


def test_sweep_on_a_postgresql_server_and_join(tmp_path, task, capsys):
    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg2")
    server = pgserver.get_server(tmp_path / "pg", cleanup_mode="delete")
    try:
        url = server.get_uri()
        config = write_sweep(tmp_path, task, {"rank": [2, 4, 8]}, trials=3)
        out = tmp_path / "sweep"
        assert main(["sweep", "--config", str(config), "--out", str(out), "--storage", url, "--study", "pg",
                     "--threads", "1"]) == 0
        assert not (out / "study.db").exists()
        study = optuna.load_study(study_name="pg", storage=with_driver(url))
        assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3
        capsys.readouterr()
        # a worker joining the finished sweep reads its settings from the study and has nothing to do
        assert main(["sweep", "--join", url, "--threads", "1"]) == 0
        assert "sweep: 3 completed, 0 pruned, 0 failed of 3 trials" in capsys.readouterr().out
    finally:
        server.cleanup()


def test_a_killed_sweep_resumes_and_reruns_the_interrupted_trial(tmp_path, task):
    base = {**task, "max_steps": 120, "eval_every": 60}
    config = write_sweep(tmp_path, base, {"rank": [2, 4, 8], "lr": {"low": 1e-3, "high": 3e-2, "log": True}},
                         trials=3)
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "lorakit", "sweep", "--config", str(config), "--out", str(out), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = out / "trials" / "1" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {t.number: t for t in study_of(out).trials}
    assert before[0].state.name == "COMPLETE" and before[1].state.name == "RUNNING"  # killed mid-trial

    assert main(["sweep", "--config", str(config), "--out", str(out), "--threads", "1"]) == 0
    after = {t.number: t for t in study_of(out).trials}
    assert after[1].state.name == "FAIL"
    rerun = next(t for t in after.values() if t.user_attrs.get("retry_of") == 1)
    assert rerun.params == before[1].params and rerun.state.name == "COMPLETE"
    assert sorted(t.state.name for n, t in after.items() if n != 1) == ["COMPLETE"] * 3
    notes = {row["number"]: row["note"] for row in leaderboard(out)}
    assert notes["1"] == f"its worker died; re-run as trial {rerun.number}"


def test_resuming_with_another_search_is_refused(tmp_path, task, capsys):
    out = tmp_path / "sweep"
    config = write_sweep(tmp_path, {**task, "max_steps": 2}, {"rank": [2, 4]}, trials=1)
    assert main(["sweep", "--config", str(config), "--out", str(out), "--threads", "1"]) == 0
    config = write_sweep(tmp_path, {**task, "max_steps": 2}, {"rank": [2, 8]}, trials=1)
    assert main(["sweep", "--config", str(config), "--out", str(out), "--threads", "1"]) == 2
    assert "already holds sweep 'lorakit-sweep' with another search" in capsys.readouterr().err


def test_ctrl_c_mid_trial_queues_it_again_and_the_rerun_finishes_the_sweep(tmp_path, task, monkeypatch, capsys):
    import lorakit.sweep.trial as trial_module

    real_train, calls = trial_module._train, []

    def train_until_the_second(config, reporter, folder):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(config, reporter, folder)

    monkeypatch.setattr(trial_module, "_train", train_until_the_second)
    config = write_sweep(tmp_path, {**task, "max_steps": 2}, {"rank": [2, 4, 8]}, trials=2)
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--threads", "1"]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    states = {t.number: (t.state.name, t.user_attrs.get("retry_of")) for t in study_of(out).trials}
    assert states == {0: ("COMPLETE", None), 1: ("FAIL", None), 2: ("WAITING", 1)}
    assert [row["state"] for row in leaderboard(out)] == ["complete", "failed", "waiting"]

    assert main(["sweep", "--config", str(config), "--out", str(out), "--threads", "1"]) == 0
    trials = study_of(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params
    assert leaderboard(out)[1]["note"] == "interrupted; re-run as trial 2"
