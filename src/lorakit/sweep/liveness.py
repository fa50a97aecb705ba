"""Which running trials still have a worker, so a sweep killed at any moment resumes where it was.

A trial's worker records who it is (host, process id, process start time) and touches a
heartbeat attribute every few seconds. A RUNNING trial is dead when its worker is on this host
and its process is gone (seen at once), or, from another host, when its heartbeat has not moved
for :data:`GRACE_SECONDS` as this process watched it (no clocks are compared across machines).
A dead trial is failed and queued again with the same settings; ``retry_of`` links the two.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

from lorakit.sweep.study import optuna

HEARTBEAT_SECONDS = 15.0
GRACE_SECONDS = 60.0
MAX_RETRIES = 2  # a trial that kills its worker every time (out of memory) is not run forever


def this_worker() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _start_ticks(pid)}


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _start_ticks(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22 of stat: start time


def alive_here(worker: dict[str, Any]) -> bool:
    """Whether a worker process of this host still runs (not a zombie, not a reused process id)."""
    pid = worker.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    fields = _stat(pid)
    if fields is None:
        return True  # no /proc: existence is all we know
    if fields[0] in ("Z", "X"):
        return False
    started = worker.get("started")
    return started is None or _start_ticks(pid) == started


class Heartbeat:
    """While a trial runs: its ``alive`` attribute counts up every :data:`HEARTBEAT_SECONDS`."""

    def __init__(self, trial, every: float = HEARTBEAT_SECONDS) -> None:
        self.trial = trial
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="sweep-heartbeat")

    def _beat(self) -> None:
        count = 0
        while True:
            count += 1
            with contextlib.suppress(Exception):  # the storage is briefly unreachable: the next beat tries again
                self.trial.set_user_attr("alive", count)
            if self.stop.wait(self.every):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


class Watch:
    """Finds dead RUNNING trials, fails them and queues their settings again."""

    def __init__(self, grace: float = GRACE_SECONDS) -> None:
        self.grace = grace
        self.seen: dict[int, tuple[Any, float]] = {}  # trial number → (last heartbeat seen, when it moved)
        self.host = socket.gethostname()

    def dead(self, trial, now: float) -> bool:
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") == self.host:
            return not alive_here(worker)
        beat = trial.user_attrs.get("alive")
        last = self.seen.get(trial.number)
        if last is None or last[0] != beat:
            self.seen[trial.number] = (beat, now)
            return False
        return now - last[1] > self.grace

    def recover(self, study) -> list[int]:
        """The numbers of the dead trials this call failed and queued again."""
        module = optuna()
        requeued = []
        now = time.monotonic()
        for trial in study.get_trials(deepcopy=False, states=(module.trial.TrialState.RUNNING,)):
            if not self.dead(trial, now):
                continue
            try:
                study.tell(trial.number, state=module.trial.TrialState.FAIL)
            except (ValueError, module.exceptions.UpdateFinishedTrialError):
                continue  # another worker failed it first, and queues it
            if requeue(study, frozen(study, trial.number)):
                requeued.append(trial.number)
        return requeued


def requeue(study, trial) -> bool:
    """Queue a failed trial's settings again (False once it has been retried :data:`MAX_RETRIES` times)."""
    retries = trial.user_attrs.get("retries", 0)
    if retries >= MAX_RETRIES:
        return False
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "retries": retries + 1})
    return True


def frozen(study, number: int):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)
