"""The node's query endpoint without a node: a thread plays the processor answering the queue."""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from contracts.envelopes import Payload
from orchestrator._queries import QueryRequest, handle_http, query_path
from orchestrator.health import Health, HealthServer
from orchestrator.payloads import JSON


@pytest.fixture
def answered() -> Iterator[tuple[queue.SimpleQueue[QueryRequest], list[QueryRequest]]]:
    """A queue whose requests are answered: ``echo`` returns its argument, anything else fails
    with UnknownQuery."""
    requests: queue.SimpleQueue[QueryRequest] = queue.SimpleQueue()
    seen: list[QueryRequest] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                request = requests.get(timeout=0.05)
            except queue.Empty:
                continue
            seen.append(request)
            if request.name == "echo":
                request.reply(request.arg or Payload(encoding="binary/null"))
            else:
                request.fail("UnknownQuery", f"no query {request.name!r}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield requests, seen
    stop.set()
    thread.join(5)


def test_get_and_post_reach_the_processor_with_the_id_name_and_argument(
    answered: tuple[queue.SimpleQueue[QueryRequest], list[QueryRequest]],
) -> None:
    requests, seen = answered
    path = query_path("order/1 ü", "echo")
    assert path == "/workflows/order%2F1%20%C3%BC/query/echo"
    assert handle_http("GET", path + "?arg=%7B%22a%22%3A1%7D", None, requests, 5) == (
        200,
        b'{"a":1}',
    )
    assert handle_http("POST", path, b" [1, 2] ", requests, 5) == (200, b"[1, 2]")
    assert handle_http("GET", path, None, requests, 5) == (200, b"null")
    assert [(r.workflow_id, r.name) for r in seen] == [("order/1 ü", "echo")] * 3
    assert seen[1].arg == Payload(encoding=JSON, data=b"[1, 2]")


def test_errors_are_json_with_a_status(
    answered: tuple[queue.SimpleQueue[QueryRequest], list[QueryRequest]],
) -> None:
    requests, _ = answered
    status, body = handle_http("GET", query_path("wf", "nope"), None, requests, 5) or (0, b"")
    assert (status, json.loads(body)["error"]) == (404, "UnknownQuery")
    status, body = handle_http("POST", query_path("wf", "echo"), b"{bad", requests, 5) or (0, b"")
    assert (status, json.loads(body)["error"]) == (400, "InvalidArgument")
    status, body = handle_http("GET", query_path("wf", "echo"), None, None, 5) or (0, b"")
    assert (status, json.loads(body)["error"]) == (503, "Unavailable")


def test_a_loop_that_does_not_answer_is_unavailable_not_a_hang() -> None:
    requests: queue.SimpleQueue[QueryRequest] = queue.SimpleQueue()
    status, body = handle_http("GET", query_path("wf", "q"), None, requests, 0.05) or (0, b"")
    assert (status, json.loads(body)["error"]) == (503, "Unavailable")


@pytest.mark.parametrize("path", ["/workflows", "/workflows/wf", "/workflows/wf/query/", "/x"])
def test_other_paths_are_not_queries(path: str) -> None:
    assert handle_http("GET", path, None, queue.SimpleQueue(), 1) is None


def test_the_health_server_serves_the_routes_over_http(
    answered: tuple[queue.SimpleQueue[QueryRequest], list[QueryRequest]],
) -> None:
    requests, _ = answered
    server = HealthServer(
        Health(),
        None,
        0,
        "127.0.0.1",
        routes=lambda method, target, body: handle_http(method, target, body, requests, 5),
    )
    base = f"http://127.0.0.1:{server.port}"
    try:
        post = urllib.request.Request(base + query_path("wf", "echo"), data=b'"hi"', method="POST")
        with urllib.request.urlopen(post, timeout=5) as answer:
            assert (answer.status, answer.read()) == (200, b'"hi"')
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(base + query_path("wf", "nope"), timeout=5)
        assert missing.value.code == 404
        assert json.loads(missing.value.read())["error"] == "UnknownQuery"
        missing.value.close()
        with pytest.raises(urllib.error.HTTPError) as other:
            urllib.request.urlopen(
                urllib.request.Request(base + "/x", data=b"", method="POST"), timeout=5
            )
        assert other.value.code == 404
        other.value.close()
    finally:
        server.close()
