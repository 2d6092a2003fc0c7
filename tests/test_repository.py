"""The repository itself: no file carries an unresolved merge (a conflict marker in a doc or a
source went unnoticed once, in benchmarks/README.md)."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO

MARKER = re.compile(rb"^(<{7} |>{7} |={7}$)", re.M)


def test_no_tracked_file_has_a_merge_conflict_marker() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    marked = []
    for name in filter(None, listed):
        path = REPO / name.decode()
        if path.is_file() and MARKER.search(path.read_bytes()):
            marked.append(name.decode())
    assert marked == []
