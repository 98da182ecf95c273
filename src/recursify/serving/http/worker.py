"""The engine thread: the one place model code runs, fed and drained through thread-safe queues.

HTTP handlers live on the asyncio event loop and never touch the engine. They ``submit`` a request
(or ``cancel`` one) into an inbox guarded by a condition variable; the engine thread loops: take the
inbox, apply it to the engine, run one ``engine.step()``, and hand every new snapshot to its request's
``asyncio.Queue`` with one ``loop.call_soon_threadsafe`` per step. With no work it blocks on the
condition (no busy spin). Admission is bounded: beyond ``max_waiting`` requests not yet running, new
submissions are refused (the app answers 429).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from recursify.config import SamplingConfig
from recursify.errors import RecursifyError
from recursify.serving.engine import Engine, RequestOutput
from recursify.serving.http.metrics import ServerMetrics

Update = RequestOutput | BaseException
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests wait than the server admits; try again later (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping or its engine failed; it takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class Submission:
    """A validated request: prompt token ids, how many tokens at most, how to sample, where to stop."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: Sequence[str] = ()


@dataclass(frozen=True)
class _Add:
    request_id: str
    submission: Submission
    channel: asyncio.Queue[Update]


@dataclass(frozen=True)
class _Cancel:
    request_id: str


class EngineWorker:
    """Owns an Engine in one background thread; see the module docstring for the protocol."""

    def __init__(self, engine: Engine, max_waiting: int, metrics: ServerMetrics | None = None):
        self.engine, self.max_waiting, self.metrics = engine, max_waiting, metrics
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Cancel] = []
        self._queued = 0  # requests accepted but not yet in the engine's running batch (inbox + engine queue)
        self._ids = itertools.count()
        self._channels: dict[str, asyncio.Queue[Update]] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._deadline: float | None = None  # set by begin_shutdown (from a signal handler: no lock taken there)
        self.failure: BaseException | None = None

    # --- event-loop side ------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="recursify-engine", daemon=True)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._deadline is None and not self._stopping and self.failure is None

    def submit(self, submission: Submission) -> tuple[str, asyncio.Queue[Update]]:
        """Queue a request; returns its id and the queue its snapshots (or an exception) arrive on."""
        channel: asyncio.Queue[Update] = asyncio.Queue()
        with self._cond:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down" if self.failure is None else f"the engine failed: {self.failure}")
            if self._queued >= self.max_waiting:
                raise QueueFull(f"{self._queued} requests are waiting, the most this server queues (--max-waiting {self.max_waiting})")
            request_id = f"req-{next(self._ids)}"
            self._inbox.append(_Add(request_id, submission, channel))
            self._queued += 1
            self._cond.notify()
        return request_id, channel

    def cancel(self, request_id: str) -> None:
        """Cancel at the next step (a no-op for finished requests); its KV blocks are freed then."""
        with self._cond:
            self._inbox.append(_Cancel(request_id))
            self._cond.notify()

    def begin_shutdown(self, grace_s: float) -> None:
        """Stop admitting; waiting requests are cancelled, running ones get ``grace_s`` to finish.

        Safe to call from a signal handler: it only assigns a float (the engine thread polls it, and
        has work whenever something is left to finish).
        """
        if self._deadline is None:
            self._deadline = time.monotonic() + grace_s

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything left, end the thread and wait for it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except Exception as err:  # a bug in model code: fail the open requests instead of leaving them hanging
            log.exception("the engine thread failed; the server now answers 503")
            self.failure = err
            self._publish([(channel, err) for channel in self._channels.values()])
            self._channels.clear()

    def _iterate(self) -> bool:
        with self._cond:
            while not (self._inbox or self._stopping or self.engine.has_unfinished()):
                self._cond.wait()
            commands, self._inbox = self._inbox, []
            stopping = self._stopping
        updates: list[tuple[asyncio.Queue[Update], Update]] = []
        for command in commands:
            if isinstance(command, _Add):
                self._add(command, updates)
            else:
                self._cancel(command.request_id, updates)
        if stopping or self._deadline is not None:
            self._shut_down(stopping, updates)
        step_s = None
        if self.engine.has_unfinished():
            started = time.perf_counter()
            outputs = self.engine.step()
            step_s = time.perf_counter() - started
            for output in outputs:
                channel = self._channels[output.request_id]
                updates.append((channel, output))
                if output.finished:
                    del self._channels[output.request_id]
                    self._finished(output)
        with self._cond:
            self._queued = len(self.engine.scheduler.waiting) + sum(isinstance(command, _Add) for command in self._inbox)
        self._publish(updates)
        if self.metrics is not None:
            self.metrics.observe_engine(self.engine, self._queued, step_s)
        return not stopping

    def _add(self, command: _Add, updates: list[tuple[asyncio.Queue[Update], Update]]) -> None:
        request = command.submission
        try:
            self.engine.add_request(
                request.prompt_ids, request.max_new_tokens, request.sampling, stop=request.stop, request_id=command.request_id
            )
        except RecursifyError as err:  # the app validates first; what slips through fails this request only
            updates.append((command.channel, err))
            return
        self._channels[command.request_id] = command.channel

    def _cancel(self, request_id: str, updates: list[tuple[asyncio.Queue[Update], Update]]) -> None:
        output = self.engine.cancel(request_id)
        channel = self._channels.pop(request_id, None)
        if output is not None and channel is not None:
            updates.append((channel, output))
            self._finished(output)

    def _shut_down(self, stopping: bool, updates: list[tuple[asyncio.Queue[Update], Update]]) -> None:
        """Waiting requests go at once; running ones when the grace period is over (or at stop)."""
        overdue = stopping or (self._deadline is not None and time.monotonic() >= self._deadline)
        victims = [request.request_id for request in self.engine.scheduler.waiting]
        if overdue:
            victims += [request.request_id for request in self.engine.scheduler.running]
        for request_id in victims:
            self._cancel(request_id, updates)

    def _finished(self, output: RequestOutput) -> None:
        if self.metrics is not None:
            self.metrics.observe_finished(output)

    def _publish(self, updates: list[tuple[asyncio.Queue[Update], Update]]) -> None:
        if updates and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, updates)


def _deliver(updates: list[tuple[asyncio.Queue[Update], Update]]) -> None:
    """On the event loop: one wake-up per engine step, however many requests it advanced."""
    for channel, update in updates:
        channel.put_nowait(update)
