"""``--workers K``: K worker processes on this machine, each a `lorakit sweep --join` of the study.

Trials run in separate processes (not threads) because torch's CPU kernels and the GIL would
make threads of one process share cores badly; each worker gets ``cores // K`` torch threads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lorakit


def cores() -> int:
    """The cores this process may use (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_worker(given: int | None, base_threads: int, workers: int) -> int:
    """--threads, else the base config's threads, else the cores shared out."""
    return given or base_threads or max(1, cores() // workers)


def worker_command(target: str, study: str, out: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "lorakit", "sweep", "--join", target, "--study", study, "--out", str(out),
            "--threads", str(threads), "--worker"]


def run_workers(count: int, target: str, study: str, out: Path, threads: int) -> list[int]:
    """Start ``count`` workers and wait for them; their exit codes. On Ctrl-C each worker tells its
    running trial as interrupted (queued again for a resumed sweep) before it exits."""
    env = dict(os.environ)
    source = str(Path(lorakit.__file__).resolve().parent.parent)  # the workers run this very lorakit
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = str(threads)
    command = worker_command(target, study, out, threads)
    children = [subprocess.Popen(command, env=env) for _ in range(count)]
    try:
        return [child.wait() for child in children]
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reached the workers already; a signal sent to this process alone did not
        for child in children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)
        for child in children:
            child.wait()
        raise
