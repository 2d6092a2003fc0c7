"""Cold start: ``cellos-supervisor`` loads only what the run uses.

A CI system runs one supervisor process per cell, so every module imported at start is latency
the user pays. An unsigned run to the noop sink on the stub backend must not load the signing
library, the JetStream client, the server, the network proxies or a schema library; a JSON
document must not load the YAML parser; and signing must load cryptography only when asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, base_env, require_host

#: Runs ``cellos-supervisor FILE`` in-process, then writes the imported modules' names.
WRAPPER = """
import json, sys
from cellos.supervisor.cli import main
code = main([sys.argv[1]])
with open(sys.argv[2], "w") as out:
    json.dump({"code": code, "modules": sorted(sys.modules)}, out)
"""

NEVER_FOR_A_PLAIN_RUN = {
    # cellos mcp only: the MCP SDK and its HTTP stack.
    "mcp",
    "mcp_types",
    "uvicorn",
    "httpx2",
    "cryptography",
    "nats",
    "aiohttp",
    "starlette",
    "dnslib",
    "pydantic",
    "pydantic_core",
    "jsonschema",
    "yaml",
    "rfc8785",
    "hashlib",
    "_hashlib",
    "hmac",
    "argparse",
    # A clean run logs nothing: logging (with traceback, tokenize) loads on the first message.
    "logging",
    # Frozen dataclasses cost ~1 ms each to build at import (and pull in inspect): the values
    # on the supervisor's path are msgspec Structs.
    "dataclasses",
    "inspect",
    # msgspec would import it (and inspect, ast) only for types CellOS never uses.
    "typing_extensions",
    # msgspec's import, for what a run does not use (cellos.core.msgspec_import): uuid's
    # platform.system() call, datetime.py's pure-Python types, the schema generator's helpers.
    "platform",
    "datetime",
    "textwrap",
    "msgspec.inspect",
    # Only a value that is not plain JSON needs a deep copy (canonical.copy_and_canonical).
    "copy",
    "socket",
    "cellos.network",
    "cellos.server",
    "cellos.sinks.jetstream",
    "cellos.core.signing",
    "cellos.core.dsse",
    # Only an invalid document needs its errors translated; only a configured sink is loaded.
    "cellos.core.doc_errors",
    "cellos.sinks.jsonl",
    "cellos.sinks.dlq",
    "securesystemslib",
}


def _imported(tmp_path: Path, document: str, name: str, **env: str) -> set[str]:
    spec = tmp_path / name
    spec.write_text(document, encoding="utf-8")
    out = tmp_path / "modules.json"
    proc = _python(
        WRAPPER,
        str(spec),
        str(out),
        env=base_env(
            tmp_path, **{"CELLOS_CELL_BACKEND": "stub", "CELL_OS_USE_NOOP_SINK": "1", **env}
        ),
    )
    assert proc.returncode == 0, proc
    result = json.loads(out.read_text())
    assert result["code"] == 0, (result["code"], proc.stderr)
    return set(result["modules"])


def _python(
    code: str, *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -c code argv...`` in the repository (``env`` None: this process's), output
    captured as text."""
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


def _roots(modules: set[str], forbidden: set[str]) -> set[str]:
    return {m for m in modules for f in forbidden if m == f or m.startswith(f + ".")}


DOCUMENT = json.dumps(
    {
        "apiVersion": "cellos.io/v1",
        "kind": "ExecutionCell",
        "spec": {"id": "cold-1", "run": {"argv": ["/bin/true"]}},
    }
)


def test_plain_run_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    modules = _imported(tmp_path, DOCUMENT, "cell.json")
    assert "cellos.supervisor.lifecycle" in modules  # the wrapper really ran a cell
    assert _roots(modules, NEVER_FOR_A_PLAIN_RUN) == set()


#: Checks, after ``import cellos``, that the stand-ins used while msgspec loaded are gone and
#: that the real modules work with msgspec.
STAND_INS_CHECK = '''
import sys, cellos, uuid, msgspec
names = ("platform", "typing_extensions", "datetime", "textwrap", "msgspec.inspect")
assert not [n for n in names if n in sys.modules], [n for n in names if n in sys.modules]
import platform, typing_extensions, datetime, textwrap
assert platform.machine() and platform.python_version()
assert typing_extensions.TypedDict and textwrap.dedent(" a") == "a"
assert uuid._LINUX and uuid.uuid4().version == 4
when = msgspec.json.decode(b'"2020-01-02T03:04:05Z"', type=datetime.datetime)
assert type(when) is datetime.datetime and when.tzinfo is datetime.timezone.utc
assert msgspec.json.encode(datetime.date(2020, 1, 2)) == b'"2020-01-02"'
class S(msgspec.Struct):
    """A doc
       string."""
    when: datetime.datetime
assert msgspec.json.schema(S)["$defs"]["S"]["description"] == "A doc\\nstring."
info = msgspec.inspect.type_info(S)
assert isinstance(info.fields[0].type, msgspec.inspect.DateTimeType)
assert sys.modules["msgspec.inspect"].type_info is msgspec.inspect.type_info
print("ok")
'''


def test_stand_ins_used_while_msgspec_loads_do_not_leak() -> None:
    """``import cellos`` stands in for typing_extensions, platform, datetime, textwrap and
    msgspec.inspect while msgspec loads; afterwards each imports for real, msgspec handles the
    real datetime types, and inspection and the schema work."""
    proc = _python(STAND_INS_CHECK)
    assert proc.stdout.strip() == "ok", proc.stderr


#: Validates a plain document, then one with an IPv4 CIDR rule; after each prints which
#: DeferredPattern's sources ``re`` has compiled (its cache holds every pattern compiled,
#: msgspec's ``Meta(pattern=...)`` included).
PATTERNS_CHECK = """
import re
from cellos.core import spec
from cellos.core.loading import validate_document
kind = spec.DeferredPattern
owner = {s: n for n, v in vars(spec).items() if isinstance(v, kind) for s in v.sources}
def compiled():
    return sorted(owner[k[1]] for k in re._cache if k[1] in owner)
doc = {"apiVersion": "cellos.io/v1", "kind": "ExecutionCell",
       "spec": {"id": "a", "run": {"argv": ["/bin/true"]}}}
validate_document(doc)
print(len(set(owner.values())), compiled())
doc["spec"]["authority"] = {"egressRules": [{"cidr": "10.0.0.0/8", "port": 443}]}
validate_document(doc)
print(compiled())
"""


def test_patterns_of_absent_fields_are_not_compiled() -> None:
    """The host, CIDR, resolver and header patterns (~3 ms to compile, most of it IPv6) are
    compiled by the first document that has such a field, not at import; an IPv4 CIDR does not
    compile the IPv6 alternative."""
    proc = _python(PATTERNS_CHECK)
    assert proc.stdout.split("\n")[:2] == ["6 []", "['_CIDR']"], (proc.stdout, proc.stderr)


#: Runs the ``cellos-supervisor`` entry point, counting the garbage collections that start
#: after it is entered and before the CLI module has finished importing; reports at the fast
#: exit.
GC_WRAPPER = """
import gc, os, sys
early = []
def count(phase, info):
    cli = sys.modules.get("cellos.supervisor.cli")
    if phase == "start" and not hasattr(cli, "run_spec"):
        early.append(info["generation"])
real_exit = os._exit
def report(code):
    print(len(early), gc.isenabled(), gc.get_freeze_count() > 5000, code, flush=True)
    real_exit(code)
os._exit = report
sys.argv = ["cellos-supervisor", sys.argv[1]]
from cellos_entry import supervisor
gc.collect()  # nothing pending from this wrapper's own start
gc.callbacks.append(count)
supervisor()
"""


def test_supervisor_imports_without_garbage_collections(tmp_path: Path) -> None:
    """The command's imports (~13,000 long-lived objects) run with the collector paused and
    are frozen afterwards; collection is enabled again for the run itself."""
    spec = tmp_path / "cell.json"
    spec.write_text(DOCUMENT, encoding="utf-8")
    proc = _python(
        GC_WRAPPER,
        str(spec),
        env=base_env(tmp_path, CELLOS_CELL_BACKEND="stub", CELL_OS_USE_NOOP_SINK="1"),
    )
    assert proc.stdout.split() == ["0", "True", "True", "0"], (proc.stdout, proc.stderr)


def test_yaml_is_loaded_for_a_yaml_document_only(tmp_path: Path) -> None:
    text = (
        "apiVersion: cellos.io/v1\nkind: ExecutionCell\n"
        "spec: {id: cold-2, run: {argv: [/bin/true]}}\n"
    )
    modules = _imported(tmp_path, text, "cell.yaml")
    assert "yaml" in modules
    assert _roots(modules, {"cryptography", "pydantic"}) == set()


def test_signing_loads_cryptography_when_asked_for(tmp_path: Path) -> None:
    """Control: the guard above is not vacuous (the wrapper does see lazy imports)."""
    key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"  # a 32-byte seed, base64url
    modules = _imported(
        tmp_path,
        DOCUMENT,
        "cell.json",
        CELLOS_EVENT_SIGNING="ed25519",
        CELLOS_EVENT_SIGNING_KID="ci",
        CELLOS_EVENT_SIGNING_KEY_BASE64=key,
    )
    assert "cryptography" in modules
    assert "cellos.core.dsse" not in modules  # the default format does not load DSSE


def test_dsse_signing_loads_dsse_but_not_securesystemslib(tmp_path: Path) -> None:
    key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    modules = _imported(
        tmp_path,
        DOCUMENT,
        "cell.json",
        CELLOS_EVENT_SIGNING="ed25519",
        CELLOS_EVENT_SIGNING_FORMAT="dsse",
        CELLOS_EVENT_SIGNING_KID="ci",
        CELLOS_EVENT_SIGNING_KEY_BASE64=key,
    )
    assert "cellos.core.dsse" in modules
    assert _roots(modules, {"securesystemslib"}) == set()


FAST_EXIT = """
import atexit, sys, threading, time
from cellos.core.fast_exit import exit_now
atexit.register(lambda: open(sys.argv[1] + ".atexit", "w").write("ran"))
if sys.argv[2] == "thread":
    def late() -> None:
        time.sleep(0.2)
        open(sys.argv[1] + ".thread", "w").write("done")
    threading.Thread(target=late).start()
if sys.argv[2] == "daemon":  # a daemon thread never holds the exit (nor did it before)
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
sys.stdout.write("buffered, no newline")
exit_now(3)
"""


@pytest.mark.parametrize("case", ["alone", "thread", "daemon"])
def test_the_fast_exit_loses_nothing(tmp_path: Path, case: str) -> None:
    """``cellos-supervisor`` skips the interpreter's finalisation, but keeps its exit code,
    flushes buffered output, runs atexit handlers, and lets a working thread finish."""
    base = tmp_path / "mark"
    proc = _python(FAST_EXIT, str(base), case, env=base_env(tmp_path), timeout=20)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "mark.atexit").read_text() == "ran"
    if case == "thread":
        assert (tmp_path / "mark.thread").read_text() == "done"


def test_an_egress_cell_loads_no_certificate_code(tmp_path: Path) -> None:
    """A cell with egress and DNS authority runs its proxies, but only a ``secretInjection``
    cell needs its own CA: cryptography's x509 (~90 ms) is not loaded for the others."""
    import os
    import shutil

    require_host(os.geteuid() == 0, "root (netns, veth, nftables)")
    require_host(shutil.which("nft") is not None, "nftables (nft)")
    authority = {
        "egressRules": [{"cidr": "192.0.2.0/24", "port": 443}],
        "dnsAuthority": {
            "hostnameAllowlist": ["example.test"],
            "resolvers": [{"resolverId": "r", "address": "127.0.0.1:53"}],
        },
    }
    document = json.dumps(
        {
            "apiVersion": "cellos.io/v1",
            "kind": "ExecutionCell",
            "spec": {"id": "cold-net", "authority": authority, "run": {"argv": ["/bin/true"]}},
        }
    )
    modules = _imported(
        tmp_path,
        document,
        "cell.json",
        CELLOS_CELL_BACKEND="cellos",
        CELLOS_STATE_DIR=str(tmp_path / "state"),
    )
    assert "cellos.network.proxies" in modules  # the proxies really ran
    assert _roots(modules, {"cryptography", "cellos.network.cell_ca"}) == set()


def test_a_host_that_ran_egress_cells_does_not_load_the_network_stack_at_start(
    tmp_path: Path,
) -> None:
    """The start-up reaper releases a dead cell's address slot with plain ``os`` calls: a
    plain cell on a host with network slots does not load the network stack (nft, rtnl, C calls)."""
    state = tmp_path / "state"
    slots = state / "net" / "slots"
    slots.mkdir(parents=True)
    (state / "cells").mkdir()
    (slots / "7").symlink_to("gone-cell")  # claimed by a supervisor that died before recording
    modules = _imported(tmp_path, DOCUMENT, "cell.json", CELLOS_STATE_DIR=str(state))
    assert "cellos.hosts.reaper" in modules  # the reaper really ran
    network_stack = {"cellos.network.scope", "cellos.network.nft", "cellos.core.libc", "ctypes"}
    assert _roots(modules, network_stack) == set()
    assert not (slots / "7").is_symlink()  # and released the slot
