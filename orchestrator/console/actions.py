"""The operator actions the console offers, each a method of :class:`~orchestrator.client.Client`.

An action is offered when the client has its method (``hasattr``): ``cancel`` and ``signal``
exist; ``terminate``, ``retry_now``, ``skip`` and ``redrive`` light up once the client grows
them, with no change here as long as they take the workflow id first and the keyword
arguments below. Every action is sent only after a confirmation (a dialog, or a confirmation
page without JavaScript), and only to a workflow whose status the action applies to, read again
just before sending: a finished workflow would dead-letter it, which the sender never sees.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contracts.envelopes import WorkflowStatus
from orchestrator.client import Client

__all__ = ["ACTIONS", "Action", "ActionError", "perform"]

RUNNING = WorkflowStatus.RUNNING.value
PARKED = WorkflowStatus.PARKED.value


class ActionError(ValueError):
    """The action cannot be sent: shown to the operator, nothing was sent."""


@dataclass(frozen=True)
class Action:
    name: str  # the form's value and the client's method
    label: str
    statuses: frozenset[str]  # the workflow statuses it applies to
    fields: tuple[str, ...]  # the form's inputs: "reason", "step", "signal", "payload"
    confirm: str  # the question, with {id}
    danger: bool = False

    def available(self, client: Client) -> bool:
        return callable(getattr(client, self.name, None))

    def applies_to(self, status: str) -> bool:
        return status in self.statuses


ACTIONS: tuple[Action, ...] = (
    Action(
        "cancel",
        "Cancel",
        frozenset({RUNNING}),
        ("reason",),
        "Cancel workflow {id}? Its compensations run.",
        danger=True,
    ),
    Action(
        "terminate",
        "Terminate",
        frozenset({RUNNING, PARKED}),
        ("reason",),
        "Terminate workflow {id}? It ends at once, WITHOUT compensations.",
        danger=True,
    ),
    Action(
        "retry_now",
        "Retry now",
        frozenset({RUNNING, PARKED}),
        (),
        "Run the pending retry or the parked step of workflow {id} now?",
    ),
    Action(
        "skip",
        "Skip step",
        frozenset({RUNNING, PARKED}),
        ("step", "reason"),
        "Mark the failed compensation step of workflow {id} as skipped by an operator?",
        danger=True,
    ),
    Action("redrive", "Redrive", frozenset({PARKED}), (), "Resume the parked workflow {id}?"),
    Action(
        "signal",
        "Send signal",
        frozenset({RUNNING}),
        ("signal", "payload"),
        "Send this signal to workflow {id}?",
    ),
)

BY_NAME = {a.name: a for a in ACTIONS}


def perform(
    client: Client, action: Action, workflow_id: str, form: Mapping[str, str], operator: str
) -> str:
    """Send ``action``; returns what the client returned (a request id), as text.

    ``operator`` is recorded with the reason, so the timeline says who did it and why.
    """
    method: Any = getattr(client, action.name, None)
    if not callable(method):
        raise ActionError(f"this client has no {action.name}(): not available yet")
    reason = form.get("reason", "").strip() or "no reason given"
    by = f"{reason} (by {operator} via the console)"
    args: dict[str, Any] = {}
    if "reason" in action.fields:
        args["reason"] = by
    if "step" in action.fields:
        step = form.get("step", "").strip()
        if not step.isdigit():
            raise ActionError(f"step must be a step's number (#N in the timeline), not {step!r}")
        args["step"] = int(step)
    if action.name == "signal":
        name = form.get("signal", "").strip()
        if not name:
            raise ActionError("a signal needs a name")
        try:
            payload = json.loads(form.get("payload") or "null")
        except ValueError as exc:
            raise ActionError(f"the payload is not JSON: {exc}") from None
        return str(method(workflow_id, name, payload))
    try:
        return str(method(workflow_id, **args))
    except TypeError as exc:  # a newer client method with another signature than assumed here
        raise ActionError(f"{action.name}() of this client refused {sorted(args)}: {exc}") from exc
