"""Replay testing: does this version of the workflow code still accept the histories of the
workflows that run (or ran) on the previous one?

    from orchestrator.testing import Replayer
    from my_sagas import PlaceOrder

    def test_running_orders_still_replay() -> None:
        Replayer([PlaceOrder]).replay_file("tests/histories/order-17.json")

Histories come from ``orchestrator history export ID --json > order-17.json`` (the format of
:func:`dump_histories`), or as ``HistoryEvent`` lists from :meth:`Client.history
<orchestrator.client.Client.history>`. A replay runs ``WorkflowRun.replay``, the very code a node
runs when it rebuilds a workflow after a restart, so a history that replays here is one the node
accepts; one that does not raises :class:`~orchestrator.errors.NonDeterminismError` naming the
event and the line of workflow code.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.codec import CodecError, decode_as, encode
from contracts.envelopes import HistoryEvent, WorkflowStarted, WorkflowStatus
from orchestrator._engine.instance import WorkflowRun
from orchestrator.client import _summaries
from orchestrator.errors import NonDeterminismError
from orchestrator.workflow import WorkflowRegistry

__all__ = [
    "HISTORY_FORMAT",
    "HistoryFileError",
    "NonDeterminismError",
    "ReplayResult",
    "Replayer",
    "dump_histories",
    "load_histories",
    "workflow_type",
]

HISTORY_FORMAT = "saga-history/1"
"""The ``format`` of an exported history file."""


class HistoryFileError(ValueError):
    """A history file that cannot be read: not JSON, another format, an undecodable event."""


@dataclass(frozen=True)
class ReplayResult:
    """A history the code replayed without a difference: where the workflow stands after it."""

    workflow_id: str
    workflow_type: str
    events: int
    status: WorkflowStatus | None


class Replayer:
    """Replays histories against workflow classes (or a registry), as a node would."""

    def __init__(self, workflows: Iterable[type] | WorkflowRegistry) -> None:
        self.registry = (
            workflows if isinstance(workflows, WorkflowRegistry) else WorkflowRegistry(workflows)
        )

    def knows(self, history: Sequence[HistoryEvent]) -> bool:
        """Whether the history's workflow type is one of this replayer's workflows."""
        return self.registry.get(workflow_type(history)) is not None

    def replay(self, history: Sequence[HistoryEvent]) -> ReplayResult:
        """Replay one workflow's events; raise NonDeterminismError at the first difference.

        ``LookupError`` if its workflow type is not one of the replayer's, ``ValueError`` if the
        events are not one workflow's complete history (1, 2, 3, ... without a gap).
        """
        if not history:
            raise ValueError("an empty history: nothing to replay")
        events = sorted(history, key=lambda e: e.event_seq)
        workflow_id = events[0].workflow_id
        # A later run of the id (continue-as-new, id reuse) starts at its WorkflowStarted's seq:
        # the earlier runs' events are tombstoned.
        first = events[0].event_seq if isinstance(events[0].event, WorkflowStarted) else 1
        for expected, event in enumerate(events, start=first):
            if event.workflow_id != workflow_id:
                raise ValueError(
                    f"the history mixes workflows {workflow_id!r} and {event.workflow_id!r}"
                )
            if event.event_seq != expected:
                raise ValueError(
                    f"the history of {workflow_id} has a gap: event {expected} is missing"
                )
        kind = workflow_type(events)
        if self.registry.get(kind) is None:
            raise LookupError(
                f"workflow {workflow_id} is a {kind!r}; this replayer knows: "
                + (", ".join(self.registry.names()) or "nothing")
            )
        run = WorkflowRun.replay(workflow_id, events, self.registry)
        return ReplayResult(workflow_id, kind, len(events), run.state.status)

    def replay_file(self, path: str | Path) -> list[ReplayResult]:
        """Replay every history in an exported file; raise at the first that differs."""
        return [self.replay(history) for history in load_histories(path)]


def workflow_type(history: Sequence[HistoryEvent]) -> str:
    first = min(history, key=lambda e: e.event_seq, default=None)
    if first is None or not isinstance(first.event, WorkflowStarted):
        return ""
    return first.event.workflow_type


# --------------------------------------------------------------------------- the file format


def dump_histories(
    histories: Mapping[str, Sequence[HistoryEvent]], *, namespace: str = ""
) -> dict[str, Any]:
    """The JSON document of ``orchestrator history export --json``.

    Each event is its Avro record (base64), exactly as on the history topic, so a file stays
    readable after the schemas evolve (old versions are read like old records on the topic);
    ``kind`` and ``summary`` are there for people reading the file.
    """
    out = []
    for workflow_id, events in histories.items():
        ordered = sorted(events, key=lambda e: e.event_seq)
        out.append(
            {
                "workflow_id": workflow_id,
                "workflow_type": workflow_type(ordered),
                "events": [
                    {
                        "seq": e.event_seq,
                        "time": summary.time.isoformat(timespec="milliseconds"),
                        "kind": summary.kind,
                        "summary": summary.summary,
                        "avro": base64.b64encode(encode(e)).decode("ascii"),
                    }
                    for e, summary in zip(ordered, _summaries(ordered), strict=True)
                ],
            }
        )
    return {"format": HISTORY_FORMAT, "namespace": namespace, "histories": out}


def load_histories(path: str | Path) -> list[list[HistoryEvent]]:
    """The histories of a file written by :func:`dump_histories`."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HistoryFileError(f"cannot read {path}: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != HISTORY_FORMAT:
        raise HistoryFileError(
            f'{path} is not an exported history (no "format": "{HISTORY_FORMAT}"); '
            "write one with `orchestrator history export ID --json`"
        )
    histories: list[list[HistoryEvent]] = []
    for number, entry in enumerate(document.get("histories", []), start=1):
        events = []
        for item in entry.get("events", []):
            try:
                events.append(decode_as(base64.b64decode(item["avro"]), HistoryEvent))
            except (CodecError, KeyError, TypeError, ValueError) as exc:
                raise HistoryFileError(
                    f"{path}: history {number}, event {item.get('seq', '?')}: {exc}"
                ) from exc
        histories.append(events)
    return histories
