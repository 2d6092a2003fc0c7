"""nftables through its JSON API (``nft -j``): commands are data, never concatenated strings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from cellos.core.errors import HostError

Json = dict[str, Any]


def nft_binary() -> str:
    found = shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)
    if found is None:
        raise HostError("nft", "nftables (nft) is not installed; run scripts/setup.sh")
    return found


def run(commands: list[Json], netns: str | None = None) -> None:
    """Apply a batch atomically (nft applies one JSON document as one transaction), in the
    network namespace at ``netns`` when given."""
    doc = json.dumps({"nftables": commands})
    prefix = ["/usr/bin/nsenter", f"--net={netns}", "--"] if netns else []
    proc = subprocess.run(
        [*prefix, nft_binary(), "-j", "-f", "-"],
        input=doc,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise HostError(
            "nftables",
            proc.stderr.strip().splitlines()[-1]
            if proc.stderr
            else f"nft exited {proc.returncode}",
        )


def list_table(family: str, table: str) -> list[Json]:
    proc = subprocess.run(
        [nft_binary(), "-j", "list", "table", family, table],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        return []
    items: list[Json] = json.loads(proc.stdout).get("nftables", [])
    return items


def table_exists(family: str, table: str) -> bool:
    proc = subprocess.run(
        [nft_binary(), "list", "table", family, table], capture_output=True, timeout=30, check=False
    )
    return proc.returncode == 0


def match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def meta(key: str) -> Json:
    return {"meta": {"key": key}}


def payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}
