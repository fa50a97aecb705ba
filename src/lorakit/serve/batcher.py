"""Request batching: one worker thread gathers queued jobs into batches and runs them.

The loop blocks on the queue for the first job, then keeps taking jobs until the batching
window (counted from that first job) has passed or the batch holds ``max_batch_size`` rows.
The whole batch is handed to ``run_batch(batch, take)`` in the worker thread, so model work
never runs on the web server's event loop; jobs report back through their own callbacks.
``take(rows)`` hands out more queued jobs without waiting, so a running batch can admit new
requests between decoding steps (continuous batching).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("lorakit.serve")


class Job:
    """One unit of queued work. ``rows`` is how many batch rows it takes."""

    rows: int = 1

    def __init__(self) -> None:
        self.cancelled = False
        self.enqueued = time.monotonic()

    def cancel(self) -> None:
        """The client went away: skip the job, or stop decoding it at the next step."""
        self.cancelled = True

    def fail(self, status: int, message: str, code: str | None = None) -> None:
        raise NotImplementedError


class Batcher:
    """A queue and the worker thread that turns it into batches."""

    def __init__(self, run_batch: Callable[[list[Job], Callable[[int], list[Job]]], None], *, max_batch_size: int = 16,
                 window_s: float = 0.010) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.window_s = max(0.0, window_s)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: Job | None = None  # a job that did not fit the previous batch
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="lorakit-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        for job in self._drain():
            job.fail(503, "the server is shutting down", "server_shutdown")

    def submit(self, job: Job) -> None:
        if self._thread is None or self._stopping.is_set():
            job.fail(503, "the server is shutting down and accepts no more requests; retry once it is back",
                     "server_shutdown")
            return
        self._queue.put(job)

    def pending(self) -> int:
        return self._queue.qsize() + (self._held is not None)

    # -- the loop ----------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            first = self._next(None)
            if first is None:
                break
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.window_s
            while rows < self.max_batch_size:
                try:
                    job = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if job is None:  # stop() was called: finish this batch, then leave
                    self._stopping.set()
                    break
                if rows + job.rows > self.max_batch_size:
                    self._held = job
                    break
                batch.append(job)
                rows += job.rows
            batch = [job for job in batch if not job.cancelled]
            if not batch:
                continue
            try:
                self.run_batch(batch, self.take)
            except Exception as exc:  # a failing batch fails its jobs; the server keeps serving
                log.exception("batch of %d jobs failed", len(batch))
                for job in batch:
                    job.fail(500, f"internal error while running the batch: {type(exc).__name__}: {exc}",
                             "internal_error")

    def take(self, busy: int) -> list[Job]:
        """Queued jobs that fit beside ``busy`` running rows, without waiting (worker thread only)."""
        jobs: list[Job] = []
        rows = self.max_batch_size - busy
        while rows > 0 and not self._stopping.is_set():
            try:
                job = self._next(0)
            except queue.Empty:
                break
            if job is None:
                self._stopping.set()
                break
            if job.rows > rows:
                self._held = job
                break
            if not job.cancelled:
                jobs.append(job)
                rows -= job.rows
        return jobs

    def _drain(self) -> list[Job]:
        jobs = [self._held] if self._held is not None else []
        self._held = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)
