"""What a request becomes inside the server: a job for the batcher, and the events it emits.

The HTTP layer (:mod:`lorakit.serve.app`) turns a request into a :class:`GenerationJob` or a
:class:`ClassificationJob`; the engine's worker thread runs it in a mixed-adapter batch and hands
back :class:`Delta` text pieces, then one :class:`Finished`, :class:`Failed` or
:class:`Classified`, through the job's ``emit`` callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorakit.errors import LorakitError
from lorakit.serve.batcher import Job


class ServeError(LorakitError):
    """A request the engine refuses; carries the HTTP status and OpenAI error code."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


# ---------------------------------------------------------------------------------------------
# events a job hands back (from the worker thread, through the job's ``emit`` callback)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    code: str | None = None


@dataclass(frozen=True)
class Classified:
    results: list[dict[str, Any]]
    prompt_tokens: int


Event = Delta | Finished | Failed | Classified


class _EmittingJob(Job):
    def __init__(self, emit: Callable[[Event], None]) -> None:
        super().__init__()
        self._emit = emit
        self.finished = False

    def emit(self, event: Event) -> None:
        if self.finished:
            return
        if isinstance(event, Finished | Failed | Classified):
            self.finished = True
        try:
            self._emit(event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled = True

    def fail(self, status: int, message: str, code: str | None = None) -> None:
        self.emit(Failed(status, message, code))


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class GenerationJob(_EmittingJob):
    def __init__(self, adapter: str, prompt_ids: list[int], params: SamplingParams,
                 emit: Callable[[Event], None]) -> None:
        super().__init__(emit)
        self.adapter, self.prompt_ids, self.params = adapter, list(prompt_ids), params
        self.version = adapter  # the model's name for the adapter version it runs on: set on admission


class ClassificationJob(_EmittingJob):
    def __init__(self, adapter: str, inputs: list[list[int]], emit: Callable[[Event], None]) -> None:
        super().__init__(emit)
        self.adapter, self.inputs = adapter, inputs
        self.version = adapter  # as GenerationJob.version
        self.rows = len(inputs)
