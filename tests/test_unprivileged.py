"""The ``cellos`` backend as an unprivileged user: cells run in a user namespace.

The test process is root; it forks and the child drops to ``nobody`` (uid/gid 65534) before
using the backend, with every module imported beforehand (the interpreter's own files may not
be readable by ``nobody``).
"""

from __future__ import annotations

import codecs
import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from cellos.core.errors import CellosError
from cellos.core.loading import validate_document
from cellos.core.ports import WorkloadRequest
from cellos.hosts.cellos import CellosBackend
from cellos.hosts.cellos.seccomp_filter import workload_filter_bpf
from tests.conftest import doc, require_sandbox

NOBODY = 65534


def as_nobody(work: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create the unprivileged user's process")
    require_sandbox()
    workload_filter_bpf()  # compiled and cached before the fork
    # Codecs are imported on first use, from files nobody may not read (e.g. under /root).
    for name in ("ascii", "utf-8", "latin-1"):
        codecs.lookup(name)
    home = tempfile.mkdtemp(prefix="cellos-nobody-")
    os.chown(home, NOBODY, NOBODY)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read_fd)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.environ["HOME"] = home
            out = work(home)
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            out = {"crash": traceback.format_exc()}
        os.write(write_fd, json.dumps(out).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    shutil.rmtree(home, ignore_errors=True)
    result: dict[str, Any] = json.loads(data)
    assert "crash" not in result, result.get("crash")
    return result


def _run(home: str, script: str, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    backend = CellosBackend(state_root=os.path.join(home, "state"))
    run: dict[str, Any] = {"argv": ["/bin/sh", "-c", script]}
    if limits:
        run["limits"] = limits
    spec = validate_document(doc("unpriv-1", run=run)).spec
    try:
        handle = backend.create(spec)
    except CellosError as exc:
        return {"error": f"{exc.path}: {exc.reason}"}
    try:
        result = backend.run(
            handle,
            WorkloadRequest(
                argv=spec.run.argv,
                env={"X": "1"},
                working_directory="/workspace",
                deadline_seconds=30,
                graceful_shutdown_seconds=1,
            ),
        )
    finally:
        backend.destroy(handle)
    return {
        "exit": result.exit_code,
        "stdout": result.stdout.decode(),
        "stderr": result.stderr.decode(),
        "isolation": list(handle.isolation),
        "left": os.listdir(os.path.join(home, "state", "cells")),
    }


def test_unprivileged_user_gets_a_full_sandbox() -> None:
    script = (
        "echo uid=$(id -u) pid=$$ host=$(hostname); "
        "grep -E '^(NoNewPrivs|CapEff|Seccomp):' /proc/self/status; "
        "touch /usr/x 2>/dev/null || echo ro; echo w > /workspace/f && echo rw; "
        "ls /proc | grep -cE '^[0-9]+$'"
    )
    out = as_nobody(lambda home: _run(home, script))
    assert out["exit"] == 0, out
    lines = out["stdout"].splitlines()
    assert lines[0] == "uid=65534 pid=2 host=unpriv-1"
    assert sorted(lines[1:4]) == ["CapEff:\t0000000000000000", "NoNewPrivs:\t1", "Seccomp:\t2"]
    assert lines[4:6] == ["ro", "rw"]
    assert int(lines[6]) <= 4  # pid 1, the shell, ls, grep
    assert "ns:user" in out["isolation"]
    assert out["left"] == []


def test_unprivileged_limits_are_refused_clearly_when_cgroups_are_not_delegated() -> None:
    out = as_nobody(lambda home: _run(home, "true", limits={"pidsMax": 10}))
    assert out["error"].startswith("spec.run.limits: cannot be enforced on this host:"), out
