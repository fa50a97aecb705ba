"""A worker: asks the study for trials and runs them until the sweep has its trials.

``--trials N`` counts trials that ended (completed, pruned, or failed with an error) plus those
running or queued; a trial whose worker died does not count, its re-run does. Several workers
ask at once, so after asking, a worker checks how many counted trials have lower numbers: if
the sweep was full already, the trial is dropped (failed, marked ``surplus``) unrun. A worker
with nothing left to ask waits for the running trials, in case one dies and is queued again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lorakit.sweep import outputs
from lorakit.sweep.liveness import Watch
from lorakit.sweep.spec import SweepSpec
from lorakit.sweep.study import optuna
from lorakit.sweep.trial import run_trial

POLL_SECONDS = 1.0


def counted(trials: list) -> list:
    """The trials that fill the sweep's N: all but dropped surplus asks and failed trials re-run as another."""
    module = optuna()
    rerun = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return [t for t in trials if not t.user_attrs.get("surplus")
            and not (t.state == module.trial.TrialState.FAIL and t.number in rerun)]


def next_trial(study, spec: SweepSpec, watch: Watch):
    """A trial to run, or None when the sweep has all its trials and none is running."""
    module = optuna()
    states = module.trial.TrialState
    while True:
        watch.recover(study)
        trials = counted(study.get_trials(deepcopy=False))
        waiting = any(t.state == states.WAITING for t in trials)
        if not waiting and len(trials) >= spec.trials:
            if not any(t.state == states.RUNNING for t in trials):
                return None
            time.sleep(POLL_SECONDS)
            continue
        trial = study.ask()
        ahead = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
        if len(ahead) < spec.trials:
            return trial
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=states.FAIL)


def work(study, spec: SweepSpec, out: Path, threads: int, say: Callable[[str], None] = print) -> int:
    """Run trials until the sweep is done; the number this worker ran. Each finished trial gets
    its progress line and refreshes the leaderboard and best.yaml."""
    watch = Watch()
    ran = 0
    while True:
        trial = next_trial(study, spec, watch)
        if trial is None:
            return ran
        run_trial(study, trial, spec, out, threads)
        ran += 1
        trials = study.get_trials(deepcopy=False)
        say(outputs.progress_line(spec, trials, trial.number))
        outputs.write_tables(study, spec, out, trials)
