"""One trial: a `lorakit train` run in DIR/trials/<number>/, in this process.

The trial's evaluations are reported to Optuna as training makes them, so the pruner can stop a
weak trial early; the run's own printed lines go to the trial folder's train.log, so the sweep
prints one line per trial. What the leaderboard shows is kept in the trial's user attributes,
which every worker (on any machine) can read back from the storage.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import InterruptedTrainingError, LorakitError
from lorakit.sweep import liveness
from lorakit.sweep.spec import SweepSpec
from lorakit.sweep.study import optuna
from lorakit.train.config import TrainConfig

LOG_FILE = "train.log"


@dataclass
class Outcome:
    state: str  # "complete", "pruned" or "failed"
    values: list[float] | None = None
    error: str | None = None
    interrupted: bool = False


def trial_config(spec: SweepSpec, params: dict[str, Any], folder: Path, threads: int) -> TrainConfig:
    """The TrainConfig of a trial: the base, the trial's settings, its folder and threads."""
    settings = spec.space.settings(params, spec.base)
    return TrainConfig(**{**spec.base, **settings, "out": str(folder), "threads": threads, "quiet": True,
                          "resume": False})


def objective_values(spec: SweepSpec, summary: dict[str, Any]) -> list[float]:
    """The trial's objectives from its summary.json: the metric; forgetting (forgetting_nats for a
    causal LM, 1 − embedding cosine for an encoder); trainable parameters."""
    found = {"metric": summary["metric_after"], "params": float(summary["trainable_params"]),
             "forgetting": forgetting(summary)}
    if "forgetting" in spec.objectives and found["forgetting"] is None:
        raise ValueError("the run measured no forgetting (general_samples 0?)")
    values = [float(found[name]) for name in spec.objectives]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"the run's {', '.join(spec.objectives)} are not all finite numbers: {values}")
    return values


def forgetting(summary: dict[str, Any]) -> float | None:
    general = summary.get("general") or {}
    if "forgetting_nats" in general:
        return float(general["forgetting_nats"])
    if "embedding_cosine" in general:
        return 1.0 - float(general["embedding_cosine"])
    return None


def run_trial(study, trial, spec: SweepSpec, out: Path, threads: int) -> Outcome:
    """Train the trial and tell the study how it ended. KeyboardInterrupt is told as an
    interrupted (failed) trial, queued again with the same settings, and raised on."""
    module = optuna()
    folder = out / "trials" / str(trial.number)
    trial.set_user_attr("worker", liveness.this_worker())
    trial.set_user_attr("folder", str(folder))
    started = time.perf_counter()
    beat = liveness.Heartbeat(trial)
    outcome = Outcome("failed")
    try:
        with beat:
            config = trial_config(spec, spec.space.suggest(trial), folder, threads)
            trial.set_user_attr("config", config.to_dict())
            summary = _train(config, _pruning_reporter(trial, spec, module), folder)
            values = objective_values(spec, summary)
            trial.set_user_attr("config", config.to_dict())  # with the --max-length the run chose
            trial.set_user_attr("result", _result(summary, time.perf_counter() - started))
            outcome = Outcome("complete", values)
    except module.TrialPruned as pruned:
        trial.set_user_attr("result", {"seconds": round(time.perf_counter() - started, 2), "pruned": str(pruned)})
        outcome = Outcome("pruned")
    except (KeyboardInterrupt, InterruptedTrainingError):
        trial.set_user_attr("interrupted", True)
        outcome = Outcome("failed", interrupted=True)
    except Exception as exc:  # a trial's error is recorded and the sweep goes on
        message = str(exc) if isinstance(exc, LorakitError) else f"{type(exc).__name__}: {exc}"
        trial.set_user_attr("error", message[:2000])
        if folder.is_dir():  # the whole story next to the run's own output
            with (folder / LOG_FILE).open("a", encoding="utf-8") as log:
                log.write(traceback.format_exc())
        trial.set_user_attr("result", {"seconds": round(time.perf_counter() - started, 2)})
        outcome = Outcome("failed", error=message)
    state = {"complete": module.trial.TrialState.COMPLETE, "pruned": module.trial.TrialState.PRUNED,
             "failed": module.trial.TrialState.FAIL}[outcome.state]
    study.tell(trial, outcome.values, state=state)
    if outcome.interrupted:
        liveness.requeue(study, liveness.frozen(study, trial.number))
        raise KeyboardInterrupt
    return outcome


def _train(config: TrainConfig, reporter, folder: Path) -> dict[str, Any]:
    from lorakit.train.loop import train

    folder.mkdir(parents=True, exist_ok=True)
    with captured(folder / LOG_FILE):
        return train(config, on_evaluation=reporter)


@contextlib.contextmanager
def captured(path: Path) -> Iterator[None]:
    """Everything the process writes to stdout and stderr goes to ``path`` meanwhile: the run's
    printed lines, and the model loader's and libraries' output, whose handlers hold the original
    streams (hence the file descriptors are redirected too, not only sys.stdout)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with path.open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        with contextlib.suppress(ValueError):  # a stream closed meanwhile
            sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _pruning_reporter(trial, spec: SweepSpec, module):
    """Each evaluation's metric reported at its step; a weak trial is stopped (single objective),
    but never at the run's last evaluation: the training is done, its result worth keeping."""
    if len(spec.objectives) > 1:
        return None

    def report(record: dict[str, Any]) -> None:
        value = record[spec.metric_name]
        if not math.isfinite(value):
            return
        trial.report(value, record["step"])
        if record["step"] < record["total_steps"] and trial.should_prune():
            raise module.TrialPruned(f"pruned at step {record['step']} ({spec.metric_name} {value:.4g})")

    return report


def _result(summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"metric": summary["metric_after"], "metric_name": summary["metric_name"],
            "trainable_params": summary["trainable_params"], "adapter_bytes": summary.get("adapter_bytes"),
            "forgetting": forgetting(summary), "steps": summary["steps"], "seconds": round(seconds, 2)}
