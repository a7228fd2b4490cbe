"""A light guard against nondeterminism in workflow code.

Workflow code is replayed from its history, so it must not read the clock, draw random numbers,
sleep, do I/O or start threads on its own: those go through ``ctx`` (or an activity). The guard
turns such a call into a :class:`~orchestrator.errors.DeterminismViolation` at the line that made
it, instead of a history that silently fails to replay weeks later.

How it stays light:

* The forbidden functions are replaced once, process-wide, by thin wrappers (:func:`install`).
  A wrapper costs one ContextVar read when no workflow code runs, so the rest of the process (the
  engine, Kafka clients, services in the same process, other threads) is unaffected.
* The ContextVar is set only while the engine resumes a workflow's coroutine
  (:class:`GuardedCoroutine`), for that thread only.
* Only *direct* calls from workflow code are refused: a wrapper looks at its caller's file, and
  calls from the standard library, installed packages, ``orchestrator`` and ``contracts`` pass.
  So ``logging`` (which reads ``time.time``), pydantic, and tracing keep working inside workflows.

``datetime.datetime`` is a C type whose methods cannot be assigned; its ``now``/``utcnow`` are
swapped in the type's own dict (CPython only; elsewhere they stay unguarded). ``date.today`` and
``datetime.today`` read ``time.time`` and are caught there.

Known gaps, by design of a light guard: a forbidden function bound to a name before
:func:`install` in a module that is not a workflow's module (workflow modules are rebound by
:func:`guard`), and forbidden work done one library call away (``urllib.request.urlopen``).
Set ``SAGA_DETERMINISM_GUARD=off`` to disable the guard (e.g. if it ever gets in a library's way).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import gc
import io
import os
import pathlib
import random
import socket
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Generator, Iterator
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import contracts
from orchestrator.errors import DeterminismViolation

__all__ = ["GuardedCoroutine", "enabled", "guard", "install", "set_enabled"]

_NOW = "ctx.now()"
_RANDOM = "ctx.random()"
_SLEEP = "await ctx.sleep(...)"
_IO = "an activity (ctx.call): workflow code does no I/O"
_THREAD = "ctx.call / ctx.gather: workflow code starts no threads"

# (owner, attribute, what the user calls, the ctx equivalent)
_MODULE_TARGETS: list[tuple[Any, str, str, str]] = [
    (time, "time", "time.time()", _NOW),
    (time, "time_ns", "time.time_ns()", _NOW),
    (time, "sleep", "time.sleep()", _SLEEP),
    (asyncio, "sleep", "asyncio.sleep()", _SLEEP),
    (uuid, "uuid1", "uuid.uuid1()", "ctx.uuid()"),
    (uuid, "uuid4", "uuid.uuid4()", "ctx.uuid()"),
    (os, "urandom", "os.urandom()", _RANDOM),
    (builtins, "open", "open()", _IO),
    (io, "open", "io.open()", _IO),
    (socket, "create_connection", "socket.create_connection()", _IO),
    (socket.socket, "connect", "socket.connect()", _IO),
    (socket.socket, "connect_ex", "socket.connect_ex()", _IO),
    (threading.Thread, "start", "Thread.start()", _THREAD),
    *(
        (pathlib.Path, name, f"Path.{name}()", _IO)
        for name in ("open", "read_text", "read_bytes", "write_text", "write_bytes")
    ),
    *(
        (random, name, f"random.{name}()", _RANDOM)
        for name in (
            "random",
            "uniform",
            "triangular",
            "randint",
            "randrange",
            "choice",
            "choices",
            "shuffle",
            "sample",
            "getrandbits",
            "randbytes",
            "gauss",
            "normalvariate",
            "lognormvariate",
            "expovariate",
            "vonmisesvariate",
            "gammavariate",
            "betavariate",
            "paretovariate",
            "weibullvariate",
        )
    ),
]
_DATETIME_TARGETS = [("now", "datetime.now()"), ("utcnow", "datetime.utcnow()")]


class _Activation:
    """One resumption of workflow code; remembers a violation the code might catch and ignore."""

    __slots__ = ("on_violation", "violation")

    def __init__(self, on_violation: Callable[[], None] | None) -> None:
        self.violation: DeterminismViolation | None = None
        self.on_violation = on_violation


_ACTIVE: ContextVar[_Activation | None] = ContextVar("saga_workflow_code", default=None)

_enabled = os.environ.get("SAGA_DETERMINISM_GUARD", "on").strip().lower() not in (
    "0",
    "off",
    "false",
    "no",
)
_installed = False
_originals: dict[int, Any] = {}  # id(original) -> wrapper, to rebind names in workflow modules
_protected: set[str] = set()  # modules of workflow classes already rebound
_workflow_files: set[str] = set()
_verdicts: dict[str, bool] = {}  # file name -> is workflow code
_library_prefixes: tuple[str, ...] = ()


def enabled() -> bool:
    return _enabled


def set_enabled(value: bool) -> None:
    """Switch the guard on or off for workflows started (or replayed) from now on."""
    global _enabled
    _enabled = value


# --------------------------------------------------------------------------- the check


def _is_workflow_code(filename: str) -> bool:
    verdict = _verdicts.get(filename)
    if verdict is None:
        verdict = filename in _workflow_files or not (
            filename.startswith(_library_prefixes) or filename.startswith("<frozen")
        )
        _verdicts[filename] = verdict
    return verdict


def _refuse(activation: _Activation, frame: FrameType, what: str, instead: str) -> None:
    code = frame.f_code
    if not _is_workflow_code(code.co_filename):
        return
    error = DeterminismViolation(
        f"{what} called from workflow code at {code.co_filename}:{frame.f_lineno} in "
        f"{code.co_name}: workflow code is replayed and must be deterministic; use {instead}"
    )
    activation.violation = error
    if activation.on_violation is not None:
        activation.on_violation()
    raise error


def _wrap(original: Callable[..., Any], what: str, instead: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        activation = _ACTIVE.get()
        if activation is not None:
            _refuse(activation, sys._getframe(1), what, instead)
        return original(*args, **kwargs)

    return guarded


def _wrap_classmethod(descriptor: Any, what: str, instead: str) -> classmethod[Any, Any, Any]:
    def guarded(cls: type, *args: Any, **kwargs: Any) -> Any:
        activation = _ACTIVE.get()
        if activation is not None:
            _refuse(activation, sys._getframe(1), what, instead)
        return descriptor.__get__(None, cls)(*args, **kwargs)

    guarded.__name__ = guarded.__qualname__ = what.split(".")[-1].rstrip("()")
    return classmethod(guarded)


# --------------------------------------------------------------------------- installing


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs.add(os.path.dirname(os.__file__))
    dirs.add(str(Path(__file__).resolve().parents[1]))  # orchestrator/
    dirs.add(os.path.dirname(os.path.abspath(contracts.__file__)))
    out = set()
    for d in dirs:
        out.add(os.path.join(d, ""))
        out.add(os.path.join(os.path.realpath(d), ""))
    return tuple(sorted(out))


def _type_dict(cls: type) -> dict[str, Any]:
    """The writable dict behind a C type's read-only ``__dict__`` (CPython)."""
    (found,) = (r for r in gc.get_referents(cls.__dict__) if isinstance(r, dict))
    return found


def _install_datetime() -> None:
    try:
        import ctypes

        namespace = _type_dict(datetime)
        for name, what in _DATETIME_TARGETS:
            namespace[name] = _wrap_classmethod(namespace[name], what, _NOW)
        ctypes.pythonapi.PyType_Modified(ctypes.py_object(datetime))  # drop the method cache
    except Exception:  # pragma: no cover - not CPython: datetime.now stays unguarded
        return


def install() -> None:
    """Put the wrappers in place (once per process). Idempotent."""
    global _installed, _library_prefixes
    if _installed:
        return
    _installed = True
    _library_prefixes = _library_dirs()
    for owner, name, what, instead in _MODULE_TARGETS:
        original = getattr(owner, name)
        wrapper = _wrap(original, what, instead)
        setattr(owner, name, wrapper)
        _originals[id(original)] = wrapper
    _install_datetime()


def _protect(cls: type) -> None:
    """Mark the module of a workflow class as workflow code, and rebind the forbidden functions
    it imported by name before :func:`install` ran (``from time import sleep``)."""
    module: ModuleType | None = sys.modules.get(cls.__module__)
    _protected.add(cls.__module__)
    if module is None:
        return
    filename = getattr(module, "__file__", None)
    if filename:
        _workflow_files.add(filename)
        _verdicts.pop(filename, None)
    namespace = vars(module)
    for name, value in list(namespace.items()):
        wrapper = _originals.get(id(value))
        if wrapper is not None and not isinstance(value, ModuleType):
            namespace[name] = wrapper


# --------------------------------------------------------------------------- the coroutine


class GuardedCoroutine(Coroutine[Any, Any, Any]):
    """A workflow's coroutine that sets the guard while it runs.

    A violation raises where it happens (so a ``ctx.saga()`` block compensates, like for any
    error). Workflow code that catches it and goes on does not get away with it: when the code
    then returns, the violation is raised instead, and the engine fails the workflow with it.
    """

    __slots__ = ("_coro", "_on_violation", "_violation")

    def __init__(
        self, coro: Coroutine[Any, Any, Any], on_violation: Callable[[], None] | None = None
    ) -> None:
        self._coro = coro
        self._on_violation = on_violation  # the engine drops the calls not yet sent
        self._violation: DeterminismViolation | None = None

    @property
    def inner(self) -> Coroutine[Any, Any, Any]:
        return self._coro

    def send(self, value: Any) -> Any:
        return self._run(self._coro.send, value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._run(self._coro.throw, typ)
        return self._run(self._coro.throw, typ, val, tb)  # pragma: no cover - engine throws one

    def close(self) -> None:
        self._run(self._coro.close)

    def __await__(self) -> Generator[Any, None, Any]:  # pragma: no cover - driven by the engine
        return self._coro.__await__()

    def _run(self, step: Callable[..., Any], *args: Any) -> Any:
        activation = _Activation(self._on_violation)
        token = _ACTIVE.set(activation)
        try:
            return step(*args)
        except StopIteration:
            violation = self._violation or activation.violation
            if violation is not None:
                raise violation from None
            raise
        finally:
            _ACTIVE.reset(token)
            if self._violation is None:
                self._violation = activation.violation


def guard(
    coro: Coroutine[Any, Any, Any],
    cls: type,
    on_violation: Callable[[], None] | None = None,
) -> Coroutine[Any, Any, Any]:
    """The workflow coroutine of ``cls``, guarded (unchanged when the guard is off);
    ``on_violation`` runs where a violation is raised, before the code can react to it."""
    if not _enabled:
        return coro
    install()
    if cls.__module__ not in _protected:
        _protect(cls)
    return GuardedCoroutine(coro, on_violation)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No guard for code the engine runs on purpose inside an activation: a local activity
    (``ctx.run_local``) is a side effect whose result is recorded, not replayed."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
