"""Versioning against the real broker: runs started on v1 wait at a signal, the node stops, v2
(step b behind ``ctx.patched``) is deployed under the same workflow name; old runs finish the old
way and new runs the new way, both compensated when their last step fails. Then the replay tools
read the namespace's histories: v2 code accepts them all, v1 code is caught on the new runs."""

from __future__ import annotations

import json
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from contracts.activity import ActivityContract
from contracts.envelopes import WorkflowStatus
from orchestrator import workflow
from orchestrator.cli import main
from orchestrator.client import Client
from orchestrator.errors import WorkflowFailedError
from orchestrator.testing import Replayer, load_histories
from orchestrator.workflow import WorkflowContext, WorkflowRegistry

from .kit import Approval, Done, Step, ThreadStack, TripResult, build, create_topics, settings_for

pytestmark = pytest.mark.broker


def _versions(prefix: str) -> tuple[type, type]:
    a, b, c = (f"{prefix}-{x}" for x in "abc")
    do = {s: ActivityContract(f"{s}.do", s, Step, Done) for s in (a, b, c)}
    undo = {s: ActivityContract(f"{s}.undo", s, Step, Done) for s in (a, b, c)}

    @workflow.defn(name="trip")
    class TripV1:
        @workflow.run
        async def run(self, ctx: WorkflowContext, step: Step) -> TripResult:
            refs = []
            async with ctx.saga() as saga:
                refs.append((await ctx.call(do[a], Step(n=1))).ref)
                saga.on_failure(undo[a], Step(n=1))
                await ctx.wait_signal("approve", Approval)
                refs.append((await ctx.call(do[c], Step(n=3, fail=step.fail))).ref)
            return TripResult(refs=refs)

    @workflow.defn(name="trip")
    class TripV2:
        @workflow.run
        async def run(self, ctx: WorkflowContext, step: Step) -> TripResult:
            refs = []
            async with ctx.saga() as saga:
                refs.append((await ctx.call(do[a], Step(n=1))).ref)
                saga.on_failure(undo[a], Step(n=1))
                if ctx.patched("add-b"):
                    refs.append((await ctx.call(do[b], Step(n=2))).ref)
                    saga.on_failure(undo[b], Step(n=2))
                await ctx.wait_signal("approve", Approval)
                refs.append((await ctx.call(do[c], Step(n=3, fail=step.fail))).ref)
            return TripResult(refs=refs)

    return TripV1, TripV2


def _as_module(name: str, cls: type) -> str:
    """A module holding one version, for ``--workflows`` (a deploy would have a real one)."""
    module = types.ModuleType(name)
    setattr(module, cls.__name__, cls)
    sys.modules[name] = module
    return name


def _wait_for_signal(client: Client, workflow_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    step = ""
    while time.monotonic() < deadline:
        try:
            step = client.describe(workflow_id).current_step
        except LookupError:
            step = "not started yet"
        if step == "waiting for a signal":
            return
        time.sleep(0.2)
    raise AssertionError(f"{workflow_id} never waited for its signal (last: {step})")


@pytest.fixture
def modules(namespace: str) -> Iterator[tuple[str, str]]:
    v1, v2 = _versions(namespace)
    names = (_as_module(f"{namespace}_v1", v1), _as_module(f"{namespace}_v2", v2))
    yield names
    for name in names:
        sys.modules.pop(name, None)


def test_old_runs_finish_the_old_way_new_runs_the_new_way(
    kafka_bootstrap: str, namespace: str, tmp_path: Path, modules: tuple[str, str]
) -> None:
    v1, v2 = (WorkflowRegistry.from_module(sys.modules[m]) for m in modules)
    kit = build(namespace)
    kit.registry = v1
    settings = settings_for(kafka_bootstrap, namespace, tmp_path)
    create_topics(kit, settings)
    stack = ThreadStack(kit, settings)
    client = Client(settings)
    try:
        stack.start_services()
        stack.start_node()
        client.start("trip", Step(n=0), workflow_id="old-ok")
        client.start("trip", Step(n=0, fail=True), workflow_id="old-fail")
        for wf in ("old-ok", "old-fail"):
            _wait_for_signal(client, wf)
        stack.stop_node()

        kit.registry = v2  # the deploy: same workflow name, new code
        stack.start_node()
        client.start("trip", Step(n=0), workflow_id="new-ok")
        client.start("trip", Step(n=0, fail=True), workflow_id="new-fail")
        for wf in ("new-ok", "new-fail"):
            _wait_for_signal(client, wf)
        for wf in ("old-ok", "old-fail", "new-ok", "new-fail"):
            client.signal(wf, "approve", Approval(by="ops"))

        assert client.result("old-ok", TripResult, timeout=30).refs == [
            f"{namespace}-a.do#1",
            f"{namespace}-c.do#3",
        ]
        assert client.result("new-ok", TripResult, timeout=30).refs == [
            f"{namespace}-a.do#1",
            f"{namespace}-b.do#2",
            f"{namespace}-c.do#3",
        ]
        for wf in ("old-fail", "new-fail"):
            with pytest.raises(WorkflowFailedError) as failed:
                client.result(wf, timeout=30)
            assert failed.value.status == WorkflowStatus.COMPENSATED.value
            assert failed.value.error_type == "Refused"

        # What the services applied, in order (the refused step c applies nothing).
        def applied(wf: str) -> list[str]:
            mine = [k for k in kit.effects if k.split("|")[1].startswith(wf + "/")]
            mine.sort(key=lambda k: int(k.rsplit("/", 1)[1]))
            return [k.split("|")[0].removeprefix(f"{namespace}-") for k in mine]

        assert applied("old-ok") == ["a.do", "c.do"]
        assert applied("old-fail") == ["a.do", "a.undo"]
        assert applied("new-ok") == ["a.do", "b.do", "c.do"]
        assert applied("new-fail") == ["a.do", "b.do", "b.undo", "a.undo"]
        assert [e.kind for e in client.describe("new-ok").events].count("MarkerRecorded") == 1
        assert "MarkerRecorded" not in [e.kind for e in client.describe("old-ok").events]
    finally:
        stack.close()
        client.close()

    # Replay tools over the same broker: the namespace, and one exported history.
    runner = CliRunner()
    base = ["--bootstrap", kafka_bootstrap, "--partitions", "3"]
    good = runner.invoke(
        main, [*base, "replay", "--workflows", modules[1], "--namespace", namespace]
    )
    assert good.exit_code == 0, good.output
    assert "4 ok, 0 non-deterministic" in good.output
    stale = runner.invoke(
        main, [*base, "replay", "--workflows", modules[0], "--namespace", namespace]
    )
    assert stale.exit_code == 1, stale.output
    assert "2 ok, 2 non-deterministic" in stale.output
    assert "FAILED  new-ok: " in stale.output and "patch marker 'add-b'" in stale.output

    exported = runner.invoke(
        main, [*base, "--namespace", namespace, "history", "export", "new-fail", "--json"]
    )
    assert exported.exit_code == 0, exported.output
    path = tmp_path / "new-fail.json"
    path.write_text(exported.output)
    assert json.loads(exported.output)["histories"][0]["workflow_id"] == "new-fail"
    (result,) = Replayer(v2).replay_file(path)
    assert result.status is WorkflowStatus.COMPENSATED
    (history,) = load_histories(path)
    assert [e.event_seq for e in history] == list(range(1, len(history) + 1))
