"""The API contract: ``GET /openapi.json`` and a bounded schemathesis fuzz of the live server.

The OpenAPI document is generated from the route table that also registers the handlers and
parses their parameters (``cellos.server.routes``). Here a real ``cellos serve`` (subprocess,
loopback, a real nats-server with a few real runs on its stream) is fuzzed against that
document with schemathesis (pinned in pyproject.toml): every answer must be a non-5xx that
conforms to the document (status code, content type, body schema), and the fuzz is bounded
(a fixed number of examples per operation, well under 60 s on this 2-core machine). The SSE
endpoints are excluded from the fuzz because a valid request never ends by itself; their
error answers are checked directly.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from cellos.server.openapi import openapi_document
from cellos.server.projection import CellRecord
from cellos.server.routes import ROUTES
from cellos.server.schemas import CELL
from tests.conftest import doc
from tests.test_server import TOKEN, Serve, World, http, supervise
from tests.test_server import world as world  # the module fixture, shared

SCHEMA = schemathesis.openapi.from_dict(openapi_document(ROUTES))
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Examples per operation: 6 operations x 100 requests stays well within 60 s here.
EXAMPLES = 100


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[Serve]:
    supervise(world, "contract", doc("contract-1", correlation={"tenantId": "acme"}))
    server = Serve(world)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


def test_openapi_json_is_the_generated_document(live: Serve) -> None:
    with urllib.request.urlopen(f"{live.url}/openapi.json", timeout=10) as response:
        served = json.loads(response.read())
    assert served == json.loads(json.dumps(openapi_document(ROUTES)))
    assert served["openapi"] == "3.1.0"
    documented = {(m.upper(), p) for p, ops in served["paths"].items() for m in ops}
    assert {(r.method, r.path) for r in ROUTES} <= documented
    sse = served["paths"]["/v1/events/stream"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in sse
    # The record schema lists exactly what the projection serves.
    assert set(CellRecord("x").view()) | {"duplicate"} == set(CELL["properties"])


def test_sse_endpoints_refuse_bad_parameters_per_the_contract(live: Serve) -> None:
    for path in (
        "/v1/events/stream?since=x",
        "/v1/cells/contract-1/events/stream?since=",
        "/v1/cells/contract-1/logs?stream=bogus",
        "/v1/cells/contract-1/logs?offset=-1",
        "/v1/cells/contract-1/logs?follow=maybe",
    ):
        status, ctype, body = http(live, path)
        assert status == 400 and ctype.startswith("application/problem+json"), body
    # A cell not known yet is waited for (routes.py: "no 404"): the stream opens.
    request = urllib.request.Request(f"{live.url}/v1/cells/nope/events/stream", headers=AUTH)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
    status, ctype, body = http(live, "/v1/console/stream?since=1")
    assert status == 400 and ctype.startswith("application/problem+json"), body


# The SSE routes (the logs route too: its events are not JSON Schema strings) are checked above.
@SCHEMA.exclude(path_regex="(stream|logs)$").parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_fuzz_the_live_server_against_its_contract(case: Any, live: Serve) -> None:
    started = time.monotonic()
    excluded = []
    if case.operation.path == "/v1/cells" and case.method == "POST":
        # The request body schema is the document's outline (`cellos schema` has the whole):
        # a body that fits the outline may still be an invalid document (422, as documented).
        excluded.append(schemathesis.checks.positive_data_acceptance)
    case.call_and_validate(base_url=live.url, headers=AUTH, timeout=10, excluded_checks=excluded)
    assert time.monotonic() - started < 10
