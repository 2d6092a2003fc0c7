"""Every problem of an invalid document, each with its JSON path (``spec.run.argv[0]``).

msgspec stops at the first problem and names it ``$.spec.run.argv[0]``; an author fixing a
document wants all of them, in the project's path form. This walk runs only after the fast
``msgspec.convert`` failed: it follows the model's types through the data, asks msgspec about each
leaf (and about each container and struct once its parts are fine), and rewords msgspec's
messages where the model knows better (the pattern's meaning, the allowed literals).
"""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any, Literal

import msgspec

from cellos.core.spec import PATTERN_REASONS, pattern_reason

Loc = tuple[int | str, ...]
Problem = tuple[Loc, str]

_AT = re.compile(r"^(?P<msg>.*) - at `(?:key` in `)?(?P<path>\$[^`]*)`$", re.S)
_REGEX = re.compile(r"""^Expected `str` matching regex (?P<pattern>'.*'|".*")$""", re.S)
#: msgspec quotes the pattern with ``repr``.
_PATTERNS = {repr(pattern): pattern for pattern in PATTERN_REASONS}
_RULE = re.compile(r"^@(?P<field>[A-Za-z0-9_\[\].]+): (?P<reason>.*)$", re.S)
_FIELD_PART = re.compile(r"([A-Za-z0-9_]+)|\[(\d+)\]")
_SEGMENT = re.compile(r"\.([A-Za-z0-9_]+)|\[(\d+)\]")


def json_path(loc: Loc) -> str:
    """``('spec', 'run', 'argv', 0)`` -> ``spec.run.argv[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.isprintable() or not part or any(c in part for c in ".[]: "):
            # A key the author typed may hold anything; quote it so the path stays one line.
            out += f"[{json.dumps(part)}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<document>"


def problems(data: Any, model: Any) -> list[tuple[str, str]]:
    """(path, reason) of every problem found; the caller knows there is at least one."""
    found = _walk(data, model, ())
    return [(json_path(loc), reason) for loc, reason in found]


def _walk(data: Any, tp: Any, loc: Loc) -> list[Problem]:
    base, _ = _unwrap(tp)
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in typing.get_args(base):
            return []
        arms = [a for a in typing.get_args(base) if a is not type(None)]
        if len(arms) == 1:
            return _walk(data, arms[0], loc)
    elif isinstance(base, type) and issubclass(base, msgspec.Struct) and isinstance(data, dict):
        found = _walk_struct(data, base, loc)
        if found:
            return found
    elif origin is list and isinstance(data, list):
        (item,) = typing.get_args(base)
        found = [p for i, v in enumerate(data) for p in _walk(v, item, (*loc, i))]
        if found:
            return found
    elif origin is dict and isinstance(data, dict):
        key_type, value_type = typing.get_args(base)
        found = []
        for key, value in data.items():
            found += [(loc, reason) for _, reason in _leaf(key, key_type, loc)]
            found += _walk(value, value_type, (*loc, key if isinstance(key, str) else str(key)))
        if found:
            return found
    return _leaf(data, tp, loc)


def _walk_struct(data: dict[Any, Any], struct: type[msgspec.Struct], loc: Loc) -> list[Problem]:
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    found: list[Problem] = []
    for key in data:
        if key not in fields:
            found.append(((*loc, str(key)), "unknown field"))
    for name, info in fields.items():
        if name in data:
            found += _walk(data[name], info.type, (*loc, name))
        elif info.required:
            found.append(((*loc, name), "required field is missing"))
    return found


def _leaf(data: Any, tp: Any, loc: Loc) -> list[Problem]:
    """Ask msgspec about one value whose parts (if any) are fine."""
    try:
        msgspec.convert(data, tp)
    except msgspec.ValidationError as exc:
        return [_translate(str(exc), data, tp, loc)]
    # A pattern the schema states but msgspec does not check (spec.DeferredPattern): the
    # struct's __post_init__ would report only the first, and only once its parts are fine.
    for meta in _unwrap(tp)[1]:
        pattern = (getattr(meta, "extra_json_schema", None) or {}).get("pattern")
        if pattern is not None and isinstance(data, str) and not re.search(pattern, data):
            return [(loc, pattern_reason(pattern, data))]
    return []


#: What an allowed value of an enum means, where a bare list would leave the reader guessing.
_ENUM_NOTES = {
    "secretDelivery": " (env: variables; runtimeBroker: files under /run/secrets; "
    "runtimeLeasedBroker: the same files, removed after run.secretLeaseSeconds)",
}


def _translate(message: str, data: Any, tp: Any, loc: Loc) -> Problem:
    at = _AT.match(message)
    reason, where = (at["msg"], _parse_path(at["path"])) if at else (message, ())
    rule = _RULE.match(reason)
    if rule:
        sub = rule["field"]
        reason = rule["reason"]
        parts = [m[1] if m[1] else int(m[2]) for m in _FIELD_PART.finditer(sub)]
        where = (*where, *parts)
        return (*loc, *where), reason
    regex = _REGEX.match(reason)
    if regex and regex["pattern"] in _PATTERNS:
        reason = pattern_reason(_PATTERNS[regex["pattern"]], data if not where else None)
    elif reason.startswith("Invalid enum value"):
        allowed = _literals(tp)
        if allowed:
            reason = f"must be {' or '.join(repr(a) for a in allowed)}"
        field = where[-1] if where else loc[-1] if loc else None
        if field in _ENUM_NOTES:
            reason += _ENUM_NOTES[field]
    return (*loc, *where), reason


def _literals(tp: Any) -> tuple[Any, ...]:
    base, _ = _unwrap(tp)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        for arm in typing.get_args(base):
            if typing.get_origin(arm) is Literal:
                return typing.get_args(arm)
    return typing.get_args(base) if typing.get_origin(base) is Literal else ()


def _unwrap(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        return base, tuple(meta)
    return tp, ()


def _parse_path(path: str) -> Loc:
    loc: list[int | str] = []
    for match in _SEGMENT.finditer(path[1:]):
        name, index = match.groups()
        loc.append(name if name is not None else int(index))
    return tuple(loc)
