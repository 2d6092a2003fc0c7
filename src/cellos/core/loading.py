"""Reading an ExecutionCell document from a file or stdin, safely.

The file is opened with ``O_NOFOLLOW`` (a symlink planted at the path is refused), must be a
regular file, and is capped at :data:`MAX_DOCUMENT_BYTES`. Duplicate keys are an error in both
JSON and YAML: silently keeping the last one would let a reviewer read a different document
from the one that runs.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import IO, Any

import msgspec

from cellos.core.canonical import strict_loads
from cellos.core.errors import InvalidSpec
from cellos.core.spec import ExecutionCell

MAX_DOCUMENT_BYTES = 1 << 20


def read_document_bytes(path: str, stdin: IO[bytes] | None = None) -> bytes:
    """Read the raw document; ``-`` means ``stdin``."""
    if path == "-":
        if stdin is None:
            raise InvalidSpec("<stdin>", "no standard input available")
        data = stdin.read(MAX_DOCUMENT_BYTES + 1)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise InvalidSpec("<stdin>", f"document is larger than {MAX_DOCUMENT_BYTES} bytes")
        return data
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidSpec(path, "is a symlink; refusing to follow it") from None
        raise InvalidSpec(path, f"cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidSpec(path, "is not a regular file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise InvalidSpec(path, f"document is larger than {MAX_DOCUMENT_BYTES} bytes")
    return data


def _yaml_loader() -> Any:
    """PyYAML's (C when available) SafeLoader refusing duplicate keys; imported only for YAML
    documents, so a JSON document never pays for PyYAML."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml

    base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class UniqueKeyLoader(base):  # type: ignore[misc]
        """SafeLoader that refuses duplicate mapping keys."""

    def construct_unique_mapping(loader: Any, node: Any) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in result:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            result[key] = loader.construct_object(value_node, deep=True)
        return result

    UniqueKeyLoader.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_unique_mapping
    )
    _LOADER = UniqueKeyLoader
    return _LOADER


_LOADER: Any = None


def parse_document(data: bytes, source: str) -> Any:
    """Parse JSON (when the text starts with ``{``) or YAML into plain Python data."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidSpec(source, f"not valid UTF-8 (byte {exc.start})") from None
    if text.lstrip().startswith("{"):
        try:
            # Duplicate keys and NaN/Infinity are refused, as for every JSON CellOS reads.
            return strict_loads(text)
        except json.JSONDecodeError as exc:
            json_error = InvalidSpec(
                source, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            )
        except (ValueError, RecursionError) as exc:
            raise InvalidSpec(source, f"malformed JSON: {exc}") from None
        # Not JSON, but maybe a flow-style YAML mapping ({apiVersion: ..., ...}).
        try:
            return _parse_yaml(text, source)
        except InvalidSpec:
            raise json_error from None
    return _parse_yaml(text, source)


def _parse_yaml(text: str, source: str) -> Any:
    loader = _yaml_loader()
    import yaml

    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise InvalidSpec(source, _one_line(f"malformed YAML: {exc.problem}{where}")) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise InvalidSpec(source, _one_line(f"malformed YAML: {exc}")) from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        # PyYAML's constructors raise plain Python errors for values such as an impossible
        # date, an unhashable key or an int too long to convert.
        raise InvalidSpec(source, _one_line(f"malformed YAML: {exc}")) from None


def _one_line(text: str) -> str:
    """Errors are one ``error: <path>: <reason>`` line each, whatever the input contained."""
    return " ".join(text.split())


def _check_text(data: Any, loc: tuple[int | str, ...] = ()) -> None:
    """Every key and string must be real Unicode text: JSON's ``"\\ud800"`` (a lone
    surrogate) parses, but cannot be encoded, hashed into a digest or written to a log."""
    if isinstance(data, str):
        if not _is_text(data):
            from cellos.core.doc_errors import json_path

            raise InvalidSpec(json_path(loc), "contains a lone surrogate (not valid Unicode)")
    elif isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and not _is_text(key):
                from cellos.core.doc_errors import json_path

                raise InvalidSpec(json_path(loc), "has a key with a lone surrogate")
            _check_text(value, (*loc, str(key)))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            _check_text(value, (*loc, index))


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_document(data: Any) -> ExecutionCell:
    """Validate parsed data; every problem is reported with its JSON path."""
    if not isinstance(data, dict):
        raise InvalidSpec("<document>", "must be a mapping with apiVersion, kind and spec")
    _check_text(data)
    try:
        return msgspec.convert(data, ExecutionCell)
    except msgspec.ValidationError as exc:
        # Only an invalid document needs the error translation (and its regex compiles).
        from cellos.core.doc_errors import problems

        found = problems(data, ExecutionCell) or [("<document>", str(exc))]
        first, *rest = found
        raise InvalidSpec(first[0], first[1], more=rest) from None


def load_document(path: str, stdin: IO[bytes] | None = None) -> ExecutionCell:
    """Read, parse and validate an ExecutionCell document."""
    source = "<stdin>" if path == "-" else path
    return validate_document(parse_document(read_document_bytes(path, stdin), source))
