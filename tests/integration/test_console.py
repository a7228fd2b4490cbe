"""The web console in a real headless Chromium, against the broker: `orchestrator console` runs as
its own process over a namespace where sagas completed, compensated and wait for a signal.

An operator lists the workflows, filters to COMPENSATED, opens one and sees its compensations,
then cancels a waiting one from its page (a confirmation dialog first) and the history shows
the cancel, with who and why; then terminates the other waiting one the same way, and skips the
parked compensation of a third saga, which then ends COMPENSATED.

Chromium is Debian's (`make browser` installs it); Playwright for Python drives it, with no
browser download of its own. Set SAGA_CONSOLE_SCREENSHOTS=docs to refresh the docs' screenshots.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.activity import ActivityContract
from contracts.envelopes import (
    CancelRequested,
    OperatorActed,
    RetryPolicy,
    WorkflowFailed,
    WorkflowStatus,
)
from orchestrator import workflow
from orchestrator.errors import UnknownWorkflow, WorkflowFailedError
from orchestrator.workflow import Compensation, WorkflowContext

from .kit import Done, Step, Trip, TripResult, build, settings_for
from .stack import Stack, running_stack

pytestmark = pytest.mark.broker

CHROMIUM = Path(os.environ.get("SAGA_CHROMIUM", "/usr/bin/chromium"))
# As root and on a machine with no way out: no sandbox, no calls home (docs/operations.md).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000  # a page of the history scan's fallback on a busy 2-core machine


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: `make browser` installs Debian's chromium with apt-get "
            "(it could not here); SAGA_CHROMIUM names another"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _parking_workflow(prefix: str) -> type:
    """Step 2 is refused; the compensation of step 1 is refused too, so it parks."""
    a, b = f"{prefix}-a", f"{prefix}-b"
    do_a, undo_a = (ActivityContract(f"{a}.{op}", a, Step, Done) for op in ("do", "undo"))
    do_b = ActivityContract(f"{b}.do", b, Step, Done)

    @workflow.defn(name="parks")
    class Parks:
        @workflow.run
        async def run(self, ctx: WorkflowContext, step: Step) -> Done:
            retry = RetryPolicy(max_attempts=2, initial_interval_ms=50)
            async with ctx.saga():
                undo = Compensation(undo_a, Step(n=1, fail=True), retry=retry)
                await ctx.call(do_a, Step(n=1), retry=retry, compensate=undo)
                done = await ctx.call(do_b, Step(n=2, fail=True), retry=retry)
            return done

    return Parks


@pytest.fixture
def stack(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Iterator[Stack]:
    kit = build(namespace)
    kit.registry.add(_parking_workflow(namespace))
    settings = settings_for(kafka_bootstrap, namespace, tmp_path / "state")
    with running_stack(kit, settings) as running:
        yield running


@pytest.fixture
def console_url(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """`orchestrator console` on a free port, for the stack's namespace."""
    log = tmp_path / "console.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "orchestrator.cli",
                "--bootstrap", stack.settings.bootstrap_servers,
                "--namespace", stack.settings.namespace,
                "console", "--port", "0", "--refresh", "1", "--operator", "test-operator",
            ],
            stdout=subprocess.PIPE,
            stderr=err,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert " on http://" in first, f"console did not start: {first!r} {log.read_text()}"
        yield first.rsplit(" on ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stdout is not None:
            proc.stdout.close()


def _until(what: str, probe: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _start_sagas(stack: Stack) -> None:
    client = stack.client
    compensating = [
        client.start("trip", Trip(fail_at=3), workflow_id=wf) for wf in ("comp-1", "comp-2")
    ]
    done = client.start("trip", Trip(), workflow_id="ok-1")
    for wf in ("wait-1", "wait-2"):
        client.start("trip", Trip(wait_signal=True), workflow_id=wf)
    for handle in compensating:
        with pytest.raises(WorkflowFailedError) as info:
            handle.result(TripResult, timeout=60)
        assert info.value.status == WorkflowStatus.COMPENSATED.value
    done.result(TripResult, timeout=60)
    for wf in ("wait-1", "wait-2"):
        _until(f"{wf} waits for its signal", lambda: len(stack.kit.steps_of(wf)) == 2)  # noqa: B023
        _until(
            f"{wf}'s history says it waits",
            lambda: stack.client.describe(wf).current_step == "waiting for a signal",  # noqa: B023
        )


def _parked_steps(stack: Stack, workflow_id: str) -> tuple[int, ...]:
    try:
        return stack.client.describe(workflow_id).parked_steps
    except UnknownWorkflow:  # just started: the node has not written its history yet
        return ()


def _shot(page: object, name: str) -> None:
    folder = os.environ.get("SAGA_CONSOLE_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / name), full_page=True)  # type: ignore[attr-defined]


@pytest.mark.timeout(300)
def test_an_operator_finds_a_compensated_saga_and_cancels_a_waiting_one_from_the_browser(
    stack: Stack, console_url: str, browser: object
) -> None:
    from playwright.sync_api import Browser, Dialog, expect

    assert isinstance(browser, Browser)
    _start_sagas(stack)
    ns = stack.settings.namespace
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)

    # The list: every saga, with the counts per status.
    page.goto(console_url)
    expect(page.locator("tr[data-id]")).to_have_count(5)
    expect(page.locator(".count[data-status=COMPENSATED] b")).to_have_text("2")
    expect(page.locator(".count[data-status=COMPLETED] b")).to_have_text("1")
    expect(page.locator(".count[data-status=RUNNING] b")).to_have_text("2")
    _shot(page, "console.png")

    # Filter to COMPENSATED: only the two compensated sagas are left.
    page.select_option("#status", "COMPENSATED")
    page.click("#apply")
    expect(page).to_have_url(re.compile(r"[?&]status=COMPENSATED"))
    rows = page.locator("tr[data-id]")
    expect(rows).to_have_count(2)
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.id)")) == ["comp-1", "comp-2"]
    expect(page.locator("tr[data-id] .badge")).to_have_text(["COMPENSATED", "COMPENSATED"])

    # One of them: its third step refused, its first two undone in reverse order.
    page.locator("a.wf", has_text="comp-1").click()
    expect(page.locator("#status")).to_have_text("COMPENSATED")
    expect(page.locator("#error")).to_contain_text("Refused")
    compensations = page.locator("#steps tr.compensation")
    expect(compensations).to_have_count(2)
    expect(compensations.locator("td:nth-child(2)")).to_have_text([f"{ns}-b.undo", f"{ns}-a.undo"])
    expect(compensations.locator("td:nth-child(5)")).to_have_text(["completed", "completed"])
    expect(page.locator("#steps tr[data-seq='3'] td:nth-child(5)")).to_have_text("business failure")
    expect(page.locator("#timeline")).to_contain_text("(compensation)")
    expect(page.locator("#no-actions")).to_have_text("No action applies to a COMPENSATED workflow.")
    _shot(page, "console-workflow.png")

    # The waiting saga: cancel it from its page. A dismissed dialog sends nothing.
    page.goto(console_url + "workflows/wait-1")
    expect(page.locator("#waiting")).to_be_visible()
    expect(page.locator("#do-terminate")).to_be_enabled()
    expect(page.locator("#do-retry")).to_have_count(0)  # offered for a parked or retrying step
    expect(page.locator("#do-skip")).to_have_count(0)  # offered for a parked compensation
    questions: list[str] = []

    def dismiss(dialog: Dialog) -> None:
        questions.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    page.click("#do-cancel")
    assert questions == ["Cancel workflow wait-1? Its compensations run."]
    expect(page.locator("#flash")).to_have_count(0)
    assert page.url == console_url + "workflows/wait-1"

    def accept(dialog: Dialog) -> None:
        questions.append(dialog.message)
        dialog.accept()

    page.fill("input[aria-label='Cancel reason']", "stuck in test")
    page.once("dialog", accept)
    page.click("#do-cancel")
    assert len(questions) == 2
    expect(page.locator("#flash")).to_contain_text("Cancel sent")
    # The page refreshes itself until the node has applied the cancel and undone the steps.
    expect(page.locator("#status")).to_have_text("CANCELLED")
    reason = "stuck in test (by test-operator via the console)"
    expect(page.locator("#timeline")).to_contain_text(f"cancel requested: {reason}")

    history = stack.history("wait-1")
    cancels = [e.event for e in history if isinstance(e.event, CancelRequested)]
    assert [c.reason for c in cancels] == [reason]
    last = history[-1].event
    assert isinstance(last, WorkflowFailed) and last.status == WorkflowStatus.CANCELLED
    assert stack.kit.steps_of("wait-1") == ["do", "do", "undo", "undo"]

    # The other waiting saga: terminated from its page, nothing compensated, who and why kept.
    page.goto(console_url + "workflows/wait-2")
    page.fill("input[aria-label='Terminate reason']", "customer gone")
    page.once("dialog", accept)
    page.click("#do-terminate")
    assert questions[-1] == "Terminate workflow wait-2? It ends at once, WITHOUT compensations."
    expect(page.locator("#status")).to_have_text("TERMINATED")
    expect(page.locator("#timeline")).to_contain_text("terminate by test-operator: customer gone")
    acted = [e.event for e in stack.history("wait-2") if isinstance(e.event, OperatorActed)]
    assert [(a.action, a.operator, a.reason) for a in acted] == [
        ("terminate", "test-operator", "customer gone")
    ]
    assert stack.kit.steps_of("wait-2") == ["do", "do"]

    # A parked compensation: skipped from the page (the step chosen from the parked ones).
    parked = stack.client.start("parks", Step(n=0), workflow_id="parked-1")
    _until("parked-1 parks", lambda: _parked_steps(stack, "parked-1"))
    page.goto(console_url + "workflows/parked-1")
    expect(page.locator("#status")).to_have_text("PARKED")
    expect(page.locator("#steps tr.compensation td:nth-child(5)")).to_have_text("parked")
    (step,) = _parked_steps(stack, "parked-1")
    page.select_option("select[aria-label='Skip step step']", str(step))
    page.fill("input[aria-label='Skip step reason']", "undone by hand")
    page.once("dialog", accept)
    page.click("#do-skip")
    expect(page.locator("#status")).to_have_text("COMPENSATED")
    expect(page.locator("#steps tr.compensation td:nth-child(5)")).to_have_text("skipped")
    with pytest.raises(WorkflowFailedError) as info:
        parked.result(Done, timeout=30)
    assert info.value.status == WorkflowStatus.COMPENSATED.value
    acted = [e.event for e in stack.history("parked-1") if isinstance(e.event, OperatorActed)]
    assert [(a.action, a.step_seq, a.operator, a.reason) for a in acted] == [
        ("skip", step, "test-operator", "undone by hand")
    ]

    # A workflow that does not exist: a 404 page that says so.
    response = page.goto(console_url + "workflows/nope")
    assert response is not None and response.status == 404
    expect(page.locator("#problem")).to_contain_text("no workflow 'nope'")
    page.close()
