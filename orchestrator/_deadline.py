"""Blocking Kafka client calls with a deadline that holds even when the client's own does not.

librdkafka's ``send_offsets_to_transaction`` can block past its timeout when the group
coordinator goes away (librdkafka issue 5456: the coordinator request's timeout is never
checked). A node or service stuck there stops serving, leaves its group and ignores SIGTERM.
So transactional calls run on a worker thread; a call that outlives its deadline raises
:class:`Wedged` in the caller, and the caller replaces the client (a new transactional producer
fences the stuck one and aborts its transaction). The stuck thread is a daemon and is abandoned
with its client: it can neither block the process's exit nor be reused.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[], Any], "Future[Any]"]


class Wedged(Exception):
    """A client call did not return within its deadline; the client must be replaced."""


class DeadlineCaller:
    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._start_worker()

    def _start_worker(self) -> None:
        jobs = self._jobs
        threading.Thread(target=self._work, args=(jobs,), name=self._name, daemon=True).start()

    @staticmethod
    def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
        while (job := jobs.get()) is not None:
            call, future = job
            try:
                future.set_result(call())
            except BaseException as exc:  # handed to the caller, who decides
                future.set_exception(exc)

    def call(self, what: str, call: Callable[[], T], deadline_s: float) -> T:
        """``call()`` on the worker; its result or exception, or :class:`Wedged` after
        ``deadline_s`` (the worker is then abandoned and a new one serves later calls)."""
        future: Future[T] = Future()
        self._jobs.put((call, future))
        try:
            return future.result(deadline_s)
        except TimeoutError:
            if future.done():  # finished just now
                return future.result()
            self._jobs.put(None)  # the stuck worker ends if its call ever returns
            self._jobs = queue.SimpleQueue()
            self._start_worker()
            raise Wedged(f"{what} did not return within {deadline_s:.0f}s") from None

    def close(self) -> None:
        self._jobs.put(None)
