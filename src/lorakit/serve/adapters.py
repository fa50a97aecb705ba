"""Which adapters a server serves, under which of the model's names, and how they change.

Each served name points at one loaded *version* of its adapter: the model's adapter of the same
name, or ``name#k`` after a hot swap or reload. The batch loop binds a request to a version when
it admits it, and the request keeps that version until it finishes. So an adapter change never
waits for a running request, and no running request sees one:

- **unload**: the name stops being served at once (new requests naming it get 404); requests
  already running on it finish on it; its version is freed between decoding steps once no
  running row uses it.
- **hot swap** (loading a name that is served): when no running row uses the current version,
  the new file is copied into its tensors in place; otherwise the new version is loaded beside
  it. Either way requests admitted afterwards get the new weights, and running ones finish on
  the old, which is then freed as after an unload.
- **reload of a name being unloaded** is a load: the new version serves it at once, while the
  old one finishes its requests and is freed.

The model changes (load, in-place replace, delete) only where no forward runs: under the
engine's lock, which a running batch holds. The batch loop applies queued changes between two
decoding steps (:meth:`ServedAdapters.between_steps`), so a load waits for at most one step; when
no batch runs, the request handler applies them itself. Whoever releases the lock checks the
queue again afterwards (:meth:`ServedAdapters.pump`), so no change is left waiting for a batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from lorakit.io.adapter_files import AdapterFile, load_adapter
from lorakit.mixed import BASE
from lorakit.model import AdaptedModel

log = logging.getLogger("lorakit.serve")

VERSION_MARK = "#"  # served names may not contain it, so a version name never collides with one
PUMP_POLL_S = 0.01  # how often a waiting load retries the lock (a running batch applies it sooner)


@dataclass
class Load:
    """A load or hot swap, queued until the model may change; the handler waits for ``done``."""

    name: str
    adapter: AdapterFile
    labels: list[str]
    source: str
    done: threading.Event = field(default_factory=threading.Event)
    replaced: bool = False
    error: BaseException | None = None


class ServedAdapters:
    """Served name → model version, the versions being freed, and the queue of loads."""

    def __init__(self, model: AdaptedModel, lock: threading.RLock) -> None:
        self.model = model
        self.lock = lock  # the engine's: running batches hold it; every model change happens under it
        self._mutex = threading.Lock()  # the bookkeeping below; never held during a forward
        self._routes: dict[str, str] = {n: n for n in model.configs if not n.endswith("__incoming")}
        self._retiring: dict[str, str] = {}  # version no longer served → the name it served
        self._queue: list[Load] = []
        self.running: tuple[str, ...] = ()  # the versions of the running batch's rows (set by its loop)
        self.label_names: dict[str, list[str]] = {}
        self.sources: dict[str, str] = {}
        self._publish()

    # -- reading (request handlers, without waiting for anything) ---------------------------
    def _publish(self) -> None:
        """Fresh immutable views, so readers on other threads never see a dict being changed."""
        self.routes: dict[str, str] = dict(self._routes)
        self.unloading: frozenset[str] = frozenset(set(self._retiring.values()) - set(self._routes))

    def names(self) -> list[str]:
        return list(self.routes)

    def version(self, name: str) -> str | None:
        """The model's name for what ``name`` serves now (``base`` for the base), or None."""
        return BASE if name == BASE else self.routes.get(name)

    # -- changes (request handlers) ---------------------------------------------------------
    def unload(self, name: str) -> int | None:
        """Stop serving ``name`` now; its version is freed when its running requests end (their
        number is returned). None when no adapter of that name is served."""
        with self._mutex:
            version = self._routes.pop(name, None)
            if version is None:
                return None
            self._retiring[version] = name
            self.label_names.pop(name, None)
            self.sources.pop(name, None)
            running = self.running.count(version)
            self._publish()
        log.info("unloading adapter %r: %d running requests finish on it first", name, running)
        self.pump()
        return running

    def load(self, change: Load) -> Load:
        """Queue a load and wait until it is applied (at most one decoding step while a batch runs)."""
        with self._mutex:
            self._queue.append(change)
        self.pump()
        while not change.done.wait(PUMP_POLL_S):  # a batch sets it between steps; else retry the lock
            self.pump()
        if change.error is not None:
            raise change.error
        return change

    def pump(self) -> None:
        """Apply the queue now if no batch runs; a running batch applies it at its next step."""
        while self._queue or self._retiring:
            if not self.lock.acquire(blocking=False):
                return
            try:
                self.between_steps(())
            finally:
                self.lock.release()

    # -- applying (whoever holds the engine's lock: the batch loop between steps, or pump) --
    def between_steps(self, running: Sequence[str]) -> None:
        """Apply queued loads and free retired versions no row of ``running`` uses. The caller
        holds the engine's lock, and ``running`` are the versions of every row it still runs."""
        self.running = tuple(running)
        if not self._queue and not self._retiring:
            return
        with self._mutex:
            queue, self._queue = self._queue, []
            for change in queue:
                self._apply(change)
            for version in [v for v in self._retiring if v not in self.running]:
                name = self._retiring.pop(version)
                try:
                    if version in self.model.configs:
                        self.model.delete_adapter(version)
                except Exception:  # never stop the batch loop over freeing memory
                    log.exception("freeing version %r of adapter %r failed", version, name)
                else:
                    log.info("freed %s of adapter %r", "the unloaded version" if version == name else
                             f"version {version!r}", name)
            self._publish()

    def _apply(self, change: Load) -> None:
        name, current = change.name, self._routes.get(change.name)
        try:
            if current is not None and current not in self.running:
                change.replaced = True
                try:
                    self.model.replace_adapter(current, change.adapter)  # in place when the structure allows
                finally:
                    if current not in self.model.configs:  # a copy cut short removes the adapter
                        del self._routes[name]
                        self.label_names.pop(name, None)
                        self.sources.pop(name, None)
            else:
                version = self._free_version(name)
                load_adapter(self.model, change.adapter, name=version, activate=False)
                if current is not None:  # rows still run on the old version: it retires when they end
                    change.replaced = True
                    self._retiring[current] = name
                self._routes[name] = version
            self.label_names[name] = change.labels
            self.sources[name] = change.source
        except BaseException as exc:  # handed to the waiting handler, which answers the client
            change.error = exc
        finally:
            change.done.set()

    def _free_version(self, name: str) -> str:
        if name not in self.model.configs:
            return name
        k = 1
        while f"{name}{VERSION_MARK}{k}" in self.model.configs:
            k += 1
        return f"{name}{VERSION_MARK}{k}"
