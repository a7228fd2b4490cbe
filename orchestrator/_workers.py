"""Where a service's handlers run: plain functions on worker threads, coroutines on one event loop.

Both are daemon threads, on purpose: a handler that never returns (or an hour-long one) must not
keep the process from exiting after SIGTERM; its command is answered by whoever reads the
partition next. (``concurrent.futures.ThreadPoolExecutor`` joins its threads at exit.)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Workers:
    """Up to ``size`` threads for blocking jobs (started as needed) and a lazily started event
    loop for coroutines. ``submit``/``submit_async`` never block; the caller bounds the load."""

    def __init__(self, name: str, size: int) -> None:
        self._name = name
        self._size = size
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = 0
        self._busy = 0  # jobs submitted and not finished
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("workers closed")
            self._busy += 1
            start = self._busy > self._threads and self._threads < self._size
            if start:
                self._threads += 1
        self._jobs.put(job)
        if start:
            threading.Thread(
                target=self._work, name=f"{self._name}-{self._threads}", daemon=True
            ).start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # a job reports its own outcome; this is a bug in the SDK
                log.exception("a handler job failed")
            with self._lock:
                self._busy -= 1

    def submit_async(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        loop = self._event_loop()
        asyncio.run_coroutine_threadsafe(job(), loop)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError("workers closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=_run_loop, args=(loop,), name=f"{self._name}-asyncio", daemon=True
                ).start()
                self._loop = loop
            return self._loop

    def close(self) -> None:
        """Let idle threads end; running handlers finish on their own (their answers are
        dropped by the caller)."""
        with self._lock:
            self._closed = True
            threads, loop = self._threads, self._loop
        for _ in range(threads):
            self._jobs.put(None)
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # Handlers still running when the service stops are cancelled: their commands were
        # not committed and are answered by whoever reads the partitions next.
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()
