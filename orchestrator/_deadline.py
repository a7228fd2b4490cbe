"""Blocking Kafka client calls with a deadline that holds even when the client's own does not.

librdkafka's ``send_offsets_to_transaction`` can block past its timeout when the group
coordinator goes away (librdkafka issues 5456 and 5511: the coordinator request's timeout is
never checked). A node or service stuck there stops serving, leaves its group and, since a C
call blocks signal handling in the main thread, ignores SIGTERM. So such calls run on a worker
thread while the caller waits in short slices: a call that outlives its deadline raises
:class:`Wedged`, a stop request raises :class:`Stopping`, and the caller replaces the client (a
new transactional producer fences the stuck one and settles its transaction). The stuck worker
is a daemon and is abandoned with its client: it can neither block the process's exit nor be
reused. Both the node (``_engine/processor.py``) and the services SDK use this one mechanism.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[], Any], "Future[Any]"]
_SLICE_S = 0.1  # how quickly a waiting caller notices a stop request


class Wedged(Exception):
    """A client call did not return within its deadline; the client must be replaced."""


class Stopping(Exception):
    """Asked to stop while a call waited for the broker: give the work up (it is redone)."""


def never() -> bool:
    return False


class DeadlineCaller:
    """One persistent worker thread for a client's blocking calls (a thread per call cost
    ~100 µs, twice per transaction, on a CPU-bound loop)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._start_worker()

    def _start_worker(self) -> None:
        threading.Thread(target=_work, args=(self._jobs,), name=self._name, daemon=True).start()

    def call(
        self,
        what: str,
        call: Callable[[], T],
        deadline_s: float,
        stopping: Callable[[], bool] = never,
    ) -> T:
        """``call()`` on the worker: its result or its exception; :class:`Wedged` after
        ``deadline_s``, :class:`Stopping` as soon as ``stopping()`` says so (the worker is then
        abandoned and a new one serves later calls)."""
        future: Future[T] = Future()
        self._jobs.put((call, future))
        waited = 0.0
        while True:
            try:
                return future.result(min(_SLICE_S, max(0.0, deadline_s - waited)))
            except TimeoutError:
                waited += _SLICE_S
                if future.done():
                    continue  # finished just now: the next result() returns at once
                if stopping():
                    self._abandon()
                    raise Stopping(f"stopped while waiting for {what}") from None
                if waited >= deadline_s:
                    self._abandon()
                    raise Wedged(f"{what} did not return within {deadline_s:.0f}s") from None

    def _abandon(self) -> None:
        self._jobs.put(None)  # the stuck worker ends if its call ever returns
        self._jobs = queue.SimpleQueue()
        self._start_worker()

    def close(self) -> None:
        self._jobs.put(None)


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        call, future = job
        try:
            future.set_result(call())
        except BaseException as exc:  # handed to the caller, who decides
            future.set_exception(exc)


def drop_in_background(holder: list[Any]) -> None:
    """Let the client in ``holder`` go without waiting: destroying a librdkafka client may
    block while the broker is away. The caller must hold no other reference to it."""
    threading.Thread(target=holder.clear, name="kafka-drop", daemon=True).start()
