"""``cellctl``: apply, get, describe and follow cells through the ``cellos serve`` API.

::

    cellctl apply -f cell.yaml          # submit (POST /v1/cells)
    cellctl get cells [-o json]         # GET /v1/cells
    cellctl describe cell ID            # GET /v1/cells/ID and its events
    cellctl events [-f] ID [--since N]  # list, or follow (SSE) until the run ends
    cellctl logs [-f] [--stream S] ID   # the workload's output (live with -f)

Server and token: ``--server`` / ``CELLCTL_SERVER`` (default ``http://127.0.0.1:8080``) and
``--token-file`` / ``--token`` / ``CELLCTL_TOKEN``. A problem-details answer is printed as
``error: <title>: <detail>``; exit status 2 for a refused request (4xx input errors), 1 for any
other failure, 0 on success.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

DEFAULT_SERVER = "http://127.0.0.1:8080"
ENV_SERVER = "CELLCTL_SERVER"
ENV_TOKEN = "CELLCTL_TOKEN"
#: Read timeout of one request; an SSE stream sends a keepalive at least every 15 s.
TIMEOUT_SECONDS = 60.0
_INPUT_ERRORS = frozenset({400, 413, 415, 422})
_TYPE_PREFIX = "dev.cellos.events.cell."
_SUMMARY = "dev.cellos.events.cell.compliance.v1.summary"
_MAX_DOCUMENT_BYTES = 1 << 20


class CtlError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Client:
    def __init__(self, server: str, token: str) -> None:
        self.server = server.rstrip("/")
        self.token = token

    def _request(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> Any:
        url = self.server + path
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=body, method=method, headers=headers)  # noqa: S310 - the scheme is checked in _server()
        try:
            return urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)  # noqa: S310
        except urllib.error.HTTPError as exc:
            raise _problem(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise CtlError(f"{self.server}: cannot connect: {reason}") from None

    def get(self, path: str) -> Any:
        with self._request("GET", path) as response:
            return json.loads(response.read())

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, Any]:
        with self._request("POST", path, body, content_type) as response:
            return int(response.status), json.loads(response.read())

    def stream(self, path: str) -> Iterator[dict[str, Any]]:
        """The items of a Server-Sent Events stream, as they arrive."""
        with self._request("GET", path) as response:
            data: list[str] = []
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line:
                    if data:
                        yield json.loads("\n".join(data))
                        data = []
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))

    def sse(self, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event name, data) of a Server-Sent Events stream, as they arrive."""
        with self._request("GET", path) as response:
            name, data = "message", list[str]()
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line:
                    if data:
                        yield name, json.loads("\n".join(data))
                    name, data = "message", []
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))


def _problem(exc: urllib.error.HTTPError) -> CtlError:
    code = 2 if exc.code in _INPUT_ERRORS else 1
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    title = str(body.get("title") or exc.reason or "HTTP error")
    detail = str(body.get("detail") or f"HTTP {exc.code}")
    lines = [f"{title}: {detail}"]
    errors = body.get("errors")
    if isinstance(errors, list) and len(errors) > 1:
        lines += [f"{e.get('path')}: {e.get('reason')}" for e in errors[1:] if isinstance(e, dict)]
    return CtlError("\nerror: ".join(lines), code)


# -- output ---------------------------------------------------------------------------------


def _short(event_type: Any) -> str:
    return str(event_type or "?").removeprefix(_TYPE_PREFIX)


def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _event_line(item: dict[str, Any]) -> str:
    run = str(item.get("runId") or "?")[:8]
    note = f"  REJECTED: {item['rejected']}" if item.get("rejected") else ""
    return (
        f"{item.get('seq')}  {_dash(item.get('time'))}  {_short(item.get('type'))}  "
        f"run {run} #{_dash(item.get('runSeq'))}{note}"
    )


# -- commands -------------------------------------------------------------------------------


def _cmd_apply(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.file == "-":
        body = sys.stdin.buffer.read(_MAX_DOCUMENT_BYTES + 1)
    else:
        try:
            with open(args.file, "rb") as f:
                body = f.read(_MAX_DOCUMENT_BYTES + 1)
        except OSError as exc:
            raise CtlError(f"{args.file}: cannot read: {exc.strerror}", 2) from None
    if len(body) > _MAX_DOCUMENT_BYTES:
        raise CtlError(f"{args.file}: larger than {_MAX_DOCUMENT_BYTES} bytes", 2)
    json_body = body.lstrip().startswith(b"{")
    _status, cell = client.post(
        "/v1/cells", body, "application/json" if json_body else "application/yaml"
    )
    if cell.get("duplicate"):
        out.write(
            f"cell/{cell['id']} unchanged: the identical document was submitted moments ago "
            f"and is not queued again ({cell.get('state')})\n"
        )
    else:
        out.write(f"cell/{cell['id']} submitted ({cell.get('state')})\n")
    return 0


def _cmd_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    state = args.state.upper() if args.state else None  # the API takes upper case only
    query = {k: v for k, v in (("state", state), ("tenant", args.tenant)) if v}
    path = "/v1/cells" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    result = client.get(path)
    if args.output == "json":
        out.write(json.dumps(result["items"], indent=2) + "\n")
        return 0
    rows = [["ID", "TENANT", "STATE", "ATTEMPT", "EXIT", "RUNS", "UPDATED"]]
    for cell in result["items"]:
        rows.append(
            [
                str(cell["id"]),
                _dash(cell.get("tenant")),
                _dash(cell.get("state")),
                _dash(cell.get("attempt")),
                _dash(cell.get("exitCode")),
                _dash(cell.get("runs")),
                _dash(cell.get("updatedAt") or cell.get("submittedAt")),
            ]
        )
    if len(rows) == 1:
        out.write("no cells\n")
        return 0
    _table(rows, out)
    return 0


def _cmd_describe(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    quoted = urllib.parse.quote(args.id, safe="")
    cell = client.get(f"/v1/cells/{quoted}")
    if args.output == "json":
        out.write(json.dumps(cell, indent=2) + "\n")
        return 0
    outcome = cell.get("outcome")
    if outcome and cell.get("terminalState"):
        outcome = f"{outcome} ({cell['terminalState']})"
    fields = [
        ("Name", cell["id"]),
        ("Tenant", cell.get("tenant")),
        ("State", cell.get("state")),
        ("Run", cell.get("runId")),
        ("Attempt", cell.get("attempt")),
        ("Runs", cell.get("runs")),
        ("Backend", cell.get("backend")),
        ("Outcome", outcome),
        ("Exit code", cell.get("exitCode")),
        ("Reason", cell.get("reason")),
        ("Submitted", cell.get("submittedAt")),
        ("Started", cell.get("startedAt")),
        ("Finished", cell.get("finishedAt")),
        ("Last event", cell.get("lastSeq") or None),
    ]
    for name, value in fields:
        out.write(f"{name + ':':<13}{_dash(value)}\n")
    errors = cell.get("errors") or []
    out.write(f"{'Errors:':<13}{'-' if not errors else ''}\n")
    for error in errors:
        out.write(f"  {error}\n")
    events = client.get(f"/v1/cells/{quoted}/events")
    out.write("Events:\n")
    for item in events["items"]:
        out.write(f"  {_event_line(item)}\n")
    if not events["items"]:
        out.write("  (none)\n")
    return 0


def _cmd_events(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    quoted = urllib.parse.quote(args.id, safe="")
    if not args.follow:
        since = args.since
        while True:
            page = client.get(f"/v1/cells/{quoted}/events?since={since}")
            for item in page["items"]:
                out.write(_event_line(item) + "\n")
            if not page.get("more"):
                return 0
            since = page["lastSeq"]
    # Follow until the run that is current (or, for a PENDING cell, the next one) ends.
    try:
        cell = client.get(f"/v1/cells/{quoted}")
    except CtlError:
        cell = {"state": "PENDING"}  # not known yet: its first run is on its way
    waiting_for_new_run = cell.get("state") == "PENDING"
    known_run = cell.get("runId")
    for item in client.stream(f"/v1/cells/{quoted}/events/stream?since={args.since}"):
        out.write(_event_line(item) + "\n")
        out.flush()
        if item.get("type") != _SUMMARY or item.get("rejected"):
            continue
        run = item.get("runId")
        new_run_ended = waiting_for_new_run and run != known_run
        known_run_ended = not waiting_for_new_run and known_run in (None, run)
        if new_run_ended or known_run_ended:
            return 0
    return 0


def _cmd_logs(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    import base64

    query = {"stream": args.stream, "follow": "true" if args.follow else "false"}
    if args.offset:
        query["offset"] = str(args.offset)
    if args.run:
        query["run"] = args.run
    quoted = urllib.parse.quote(args.id, safe="")
    path = f"/v1/cells/{quoted}/logs?{urllib.parse.urlencode(query)}"
    sink = getattr(out, "buffer", None)
    for name, item in client.sse(path):
        if name == "cellos.log":
            data = base64.b64decode(item.get("data") or "")
            if sink is not None:
                sink.write(data)
                sink.flush()
            else:
                out.write(data.decode("utf-8", "replace"))
                out.flush()
        elif name == "cellos.log.gap":
            print(
                f"cellctl: warning: bytes {item.get('from')}..{item.get('to')} of "
                f"{args.stream} never reached NATS (see the run's command.v1.completed)",
                file=sys.stderr,
                flush=True,
            )
        elif name == "cellos.log.end":
            return 0
    return 0


# -- entry ----------------------------------------------------------------------------------


def _server(args: argparse.Namespace) -> str:
    server = (getattr(args, "server", None) or os.environ.get(ENV_SERVER) or DEFAULT_SERVER).strip()
    scheme = urllib.parse.urlsplit(server).scheme
    if scheme not in ("http", "https"):
        raise CtlError(f"{ENV_SERVER}: must be an http:// or https:// URL, not {server!r}", 2)
    return server


def _token(args: argparse.Namespace) -> str:
    token_file = getattr(args, "token_file", None)
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read(4096).strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "is not UTF-8"
            raise CtlError(f"--token-file: cannot read {token_file}: {reason}", 2) from None
    else:
        token = (getattr(args, "token", None) or os.environ.get(ENV_TOKEN) or "").strip()
    if not token:
        raise CtlError(
            f"{ENV_TOKEN}: not set; give the API token in {ENV_TOKEN}, --token-file or --token",
            2,
        )
    return token


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=argparse.SUPPRESS,
        help=f"API URL (default: ${ENV_SERVER}, else {DEFAULT_SERVER})",
    )
    common.add_argument(
        "--token-file", default=argparse.SUPPRESS, help="file holding the API token"
    )
    common.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help=f"the API token (visible to other users in ps; prefer ${ENV_TOKEN})",
    )
    parser = argparse.ArgumentParser(
        prog="cellctl", description="Client of the CellOS HTTP API.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("apply", parents=[common], help="submit a document (YAML or JSON)")
    p.add_argument("-f", "--filename", dest="file", required=True, help="document; - for stdin")
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("get", parents=[common], help="list cells")
    p.add_argument("kind", choices=["cells", "cell"])
    p.add_argument("--state", help="only cells in this state (e.g. RUNNING)")
    p.add_argument("--tenant", help="only cells of this tenant")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=_cmd_get)

    p = sub.add_parser("describe", parents=[common], help="show one cell and its events")
    p.add_argument("kind", choices=["cell"])
    p.add_argument("id")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.set_defaults(func=_cmd_describe)

    p = sub.add_parser("events", parents=[common], help="list or follow a cell's events")
    p.add_argument("id")
    p.add_argument(
        "-f", "--follow", action="store_true", help="follow until the cell's run has ended"
    )
    p.add_argument("--since", type=int, default=0, help="after this stream sequence")
    p.set_defaults(func=_cmd_events)

    p = sub.add_parser("logs", parents=[common], help="print a cell's output (-f: live)")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the run has ended")
    p.add_argument("--stream", choices=["stdout", "stderr"], default="stdout")
    p.add_argument("--offset", type=int, default=0, help="skip this many bytes of the stream")
    p.add_argument("--run", help="a run id (default: the cell's current or next run)")
    p.set_defaults(func=_cmd_logs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "since", 0) < 0:
            raise CtlError("--since: must be a stream sequence >= 0", 2)
        if getattr(args, "offset", 0) < 0:
            raise CtlError("--offset: must be a byte offset >= 0", 2)
        client = Client(_server(args), _token(args))
        code: int = args.func(client, args, sys.stdout)
    except CtlError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
