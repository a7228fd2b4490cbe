"""The operator actions the console offers, each a method of :class:`~orchestrator.client.Client`.

An action is offered when it applies to the workflow as its history shows it (cancel a running
one, skip a parked compensation, ...), and enabled when the client has its method: a client
without it (an older one) shows the button greyed out. Every action is sent only after a
confirmation (a dialog, or a confirmation page without JavaScript), and only if it still applies
to the workflow read again just before sending: the node would dead-letter one that does not,
which the sender never sees.

Who did it is recorded with the action: as ``operator=`` where the method takes it (terminate,
retry, skip), else in the reason (cancel: ``<reason> (by <operator> via the console)``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.client import Client

from .source import Detail

__all__ = ["ACTIONS", "Action", "ActionError", "perform"]


class ActionError(ValueError):
    """The action cannot be sent: shown to the operator, nothing was sent."""


def _running(d: Detail) -> bool:
    return d.state.status is not None and not d.state.finished


def _retryable(d: Detail) -> bool:
    """A parked step or a pending retry runs at once; a BLOCKED workflow is re-run."""
    waiting = any(a.waits_for_retry for a in d.state.activities.values())
    return _running(d) and (waiting or d.state.blocked is not None)


def _parked(d: Detail) -> bool:
    return _running(d) and bool(d.state.parked)


@dataclass(frozen=True)
class Action:
    name: str  # the form's value
    method: str  # the client's method
    label: str
    applies: Callable[[Detail], bool]
    fields: tuple[str, ...]  # the form's inputs: reason, step, input, signal, payload
    confirm: str  # the question, with {id}
    danger: bool = False

    def available(self, client: Client) -> bool:
        return callable(getattr(client, self.method, None))


ACTIONS: tuple[Action, ...] = (
    Action(
        "cancel",
        "cancel",
        "Cancel",
        _running,
        ("reason",),
        "Cancel workflow {id}? Its compensations run.",
        danger=True,
    ),
    Action(
        "terminate",
        "terminate",
        "Terminate",
        _running,
        ("reason",),
        "Terminate workflow {id}? It ends at once, WITHOUT compensations.",
        danger=True,
    ),
    Action(
        "retry",
        "retry",
        "Retry now",
        _retryable,
        ("step", "input", "reason"),
        "Run the parked step or pending retry of workflow {id} now (with the new input, if "
        "one is given)?",
    ),
    Action(
        "skip",
        "skip",
        "Skip step",
        _parked,
        ("step", "reason"),
        "Mark the parked compensation of workflow {id} done WITHOUT running it?",
        danger=True,
    ),
    Action(
        "signal",
        "signal",
        "Send signal",
        _running,
        ("signal", "payload"),
        "Send this signal to workflow {id}?",
    ),
)

BY_NAME = {a.name: a for a in ACTIONS}


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ActionError(f"the {what} is not JSON: {exc}") from None


def perform(
    client: Client, action: Action, detail: Detail, form: Mapping[str, str], operator: str
) -> str:
    """Send ``action`` to the workflow of ``detail`` (read just before); returns the request id.

    Raises :class:`ActionError` for a form that does not make a valid request.
    """
    method: Any = getattr(client, action.method, None)
    if not callable(method):
        raise ActionError(f"this client has no {action.method}(): not available yet")
    if not action.applies(detail):
        raise ActionError(f"{action.label} does not apply to workflow {detail.workflow_id} now")
    workflow_id = detail.workflow_id
    if action.name == "signal":
        name = form.get("signal", "").strip()
        if not name:
            raise ActionError("a signal needs a name")
        return str(method(workflow_id, name, _json(form.get("payload") or "null", "payload")))
    args: dict[str, Any] = {}
    reason = form.get("reason", "").strip()
    if "operator" in inspect.signature(method).parameters:
        args["operator"] = operator
    else:
        reason = f"{reason or 'no reason given'} (by {operator} via the console)"
    args["reason"] = reason
    step_text = form.get("step", "").strip()
    if step_text:
        if not step_text.isdigit():
            raise ActionError(f"the step is a step's number (#N in the steps), not {step_text!r}")
        args["step"] = int(step_text)
    if action.name == "skip":
        parked = [a.seq for a in detail.state.parked]
        if args.get("step") not in parked:
            raise ActionError(f"skip needs a parked compensation's step: one of {parked}")
    if (form.get("input") or "").strip():
        if "step" not in args:
            raise ActionError("a new input needs the step it is for")
        args["input"] = _json(form["input"], "new input")
    return str(method(workflow_id, **args))
