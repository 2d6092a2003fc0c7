"""Query parameters of the HTTP API: declared once, used to parse requests and to describe
them in the OpenAPI document (:mod:`cellos.server.openapi`).

Parsing is strict and the same for every parameter of every route: a parameter the route does
not declare, one given twice (``?since=1&since=2``) or given empty (``?since=``) is refused
with 400 problem details naming it, as is a value outside its type or range. (Earlier versions
took the first of repeated values, or the default for an empty one, so ``?since=zz&since=1``
and ``?since=1&since=zz`` were answered differently.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from cellos.server.problems import bad_request


@dataclass(frozen=True)
class QueryParam:
    """One query parameter: its name, description, JSON Schema and parser."""

    name: str
    description: str
    #: Integer bounds (``kind == "integer"``).
    minimum: int | None = None
    maximum: int | None = None
    #: Allowed values (``kind == "enum"``).
    choices: Sequence[str] = ()
    kind: str = "string"  # "integer" | "enum" | "string"
    default: Any = None
    #: ``pattern`` of a string parameter.
    pattern: str | None = None
    max_length: int | None = None
    extra_schema: Mapping[str, Any] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any]
        if self.kind == "integer":
            out = {"type": "integer"}
            if self.minimum is not None:
                out["minimum"] = self.minimum
            if self.maximum is not None:
                out["maximum"] = self.maximum
        elif self.kind == "enum":
            out = {"type": "string", "enum": list(self.choices)}
        else:
            out = {"type": "string", "minLength": 1}
            if self.pattern is not None:
                out["pattern"] = self.pattern
            if self.max_length is not None:
                out["maxLength"] = self.max_length
        if self.default is not None:
            out["default"] = self.default
        out.update(self.extra_schema)
        return out

    def parse(self, text: str) -> Any:
        if self.kind == "integer":
            bound = f" and at most {self.maximum}" if self.maximum is not None else ""
            low = self.minimum if self.minimum is not None else 0
            if not text.isascii() or not text.isdigit() or len(text) > 19:
                raise bad_request(
                    f"query parameter {self.name}: must be an integer >= {low}{bound}"
                )
            value = int(text)
            if value < low or (self.maximum is not None and value > self.maximum):
                raise bad_request(
                    f"query parameter {self.name}: must be an integer >= {low}{bound}"
                )
            return value
        if self.kind == "enum":
            if text not in self.choices:
                raise bad_request(
                    f"query parameter {self.name}: must be one of {', '.join(self.choices)}"
                )
            return text
        if self.max_length is not None and len(text) > self.max_length:
            raise bad_request(
                f"query parameter {self.name}: must be at most {self.max_length} characters"
            )
        if self.pattern is not None and re.fullmatch(self.pattern, text) is None:
            raise bad_request(f"query parameter {self.name}: must match {self.pattern}")
        return text

    def openapi(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": "query",
            "required": False,
            "description": self.description,
            "schema": self.schema(),
        }


def read_query(request: web.Request, params: Sequence[QueryParam]) -> dict[str, Any]:
    """The declared parameters of ``request`` (defaults filled in), or a 400 problem."""
    declared = {p.name: p for p in params}
    for name in request.query:
        if name not in declared:
            takes = ", ".join(declared) or "no query parameters"
            raise bad_request(f"unknown query parameter {name!r} (this endpoint takes: {takes})")
    values: dict[str, Any] = {}
    for param in params:
        given = request.query.getall(param.name, [])
        if len(given) > 1:
            raise bad_request(
                f"query parameter {param.name}: given {len(given)} times; give it at most once"
            )
        if not given:
            values[param.name] = param.default
            continue
        if given[0] == "":
            raise bad_request(f"query parameter {param.name}: is empty; give a value or omit it")
        values[param.name] = param.parse(given[0])
    return values
