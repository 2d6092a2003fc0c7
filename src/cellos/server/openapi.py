"""The OpenAPI 3.1 document of ``cellos serve`` (``GET /openapi.json``), generated from the
route table (:data:`cellos.server.routes.ROUTES`) that also registers and validates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cellos.server.problems import PROBLEM_JSON
from cellos.server.routes import Route
from cellos.server.schemas import COMPONENTS

OPENAPI_PATH = "/openapi.json"
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": _PROBLEM_REF}}}


def _operation(route: Route) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for resp in route.responses:
        if resp.schema == "Problem":
            responses[str(resp.status)] = _problem(resp.description)
        elif resp.schema is not None:
            ref = {"$ref": f"#/components/schemas/{resp.schema}"}
            responses[str(resp.status)] = {
                "description": resp.description,
                "content": {resp.media: {"schema": ref}},
            }
        else:
            responses[str(resp.status)] = {
                "description": resp.description,
                "content": {resp.media: {"schema": {"type": "string"}}},
            }
    # What every route may answer besides its own responses.
    if route.params or route.sse:
        responses.setdefault(
            "400", _problem("A query parameter is unknown, repeated, empty or invalid")
        )
    if route.auth:
        responses.setdefault("401", _problem("No or wrong bearer token"))
        responses.setdefault("503", _problem("JetStream did not answer"))
    responses.setdefault("500", _problem("Internal error (see the server's log)"))
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": pattern},
        }
        for name, pattern in route.path_params.items()
    ]
    parameters += [p.openapi() for p in route.params]
    if route.sse:
        parameters.append(
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": "Resume after this stream sequence (used when `since` is absent)",
                "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
            }
        )
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "responses": responses,
    }
    if parameters:
        op["parameters"] = parameters
    if route.body is not None:
        media, schema = route.body
        ref = {"$ref": f"#/components/schemas/{schema}"}
        op["requestBody"] = {"required": True, "content": {m: {"schema": ref} for m in media}}
    if not route.auth:
        op["security"] = []
    return op


def openapi_document(routes: Sequence[Route], version: str = "0.1.0") -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    paths[OPENAPI_PATH] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document (no token needed)",
            "security": [],
            "responses": {
                "200": {
                    "description": "The OpenAPI 3.1 document of this server",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "500": _problem("Internal error"),
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "CellOS API (cellos serve)",
            "version": version,
            "description": "Cell state projected from the CELLOS_EVENTS stream, and submission "
            "to the CELLOS_CELLS work queue. Every error is RFC 9457 problem details.",
        },
        "paths": paths,
        "components": {
            "schemas": COMPONENTS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
