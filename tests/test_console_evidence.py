"""The console's evidence verdicts (pure): the same verifier as ``cellos events verify``, so
each way a run's record can fail is named, at the right sequence."""

from __future__ import annotations

from typing import Any

import pytest

from cellos.core import events as ev
from cellos.core.signing import Ed25519Signer, VerifyKeys, wrap_signed
from cellos.server.console.evidence import EvidenceIndex, RunEvidence
from tests.test_server import run_events

SIGNER = Ed25519Signer("ci", bytes(range(32)))
OTHER = Ed25519Signer("rogue", bytes(range(1, 33)))
KEYS = VerifyKeys.from_signers(SIGNER)
OTHER_SIGNATURE = wrap_signed(run_events("x")[0], SIGNER)["data"]["signature"]


def verdict(wire: list[Any], keys: VerifyKeys | None = KEYS) -> dict[str, Any]:
    run = RunEvidence("r", keys)
    for seq, event in enumerate(wire, start=101):
        run.feed(seq, event)
    return run.verdict()


def test_a_signed_complete_run() -> None:
    v = verdict([wrap_signed(e, SIGNER) for e in run_events("c")])
    assert v["ok"] and v["signed"] and v["chainIntact"] and v["complete"]
    assert v["badges"] == ["signed by ci", "chain intact", "complete"]
    assert v["verify"] == "ok: 6 events in 1 run(s), signatures valid, chain intact"
    assert v["problem"] is None and v["kids"] == ["ci"]


def test_forced_and_in_progress() -> None:
    v = verdict([wrap_signed(e, SIGNER) for e in run_events("c", forced=True)])
    assert v["ok"] and v["forced"] and not v["reaped"] and v["badges"][-1] == "forced"
    partial = verdict([wrap_signed(e, SIGNER) for e in run_events("c")[:3]])
    assert not partial["ok"] and partial["badges"][-1] == "in progress"
    assert partial["verify"].startswith("error: stream seq 103: run ")


@pytest.mark.parametrize(
    ("mutate", "kind", "badge"),
    [
        (lambda w, e: e, "unsigned", "unsigned at seq 2"),
        (lambda w, e: wrap_signed(e, OTHER), "unknown-key", "unknown key at seq 2"),
        (
            # Another event's (valid) signature: the right key, the wrong bytes.
            lambda w, e: {**w, "data": {**w["data"], "signature": OTHER_SIGNATURE}},
            "bad-signature",
            "bad signature at seq 2",
        ),
    ],
)
def test_each_problem_is_named_at_its_seq(mutate: Any, kind: str, badge: str) -> None:
    events = run_events("c")
    wire = [wrap_signed(e, SIGNER) for e in events]
    wire[2] = mutate(wire[2], events[2])
    v = verdict(wire)
    assert v["problem"]["kind"] == kind and v["problem"]["streamSeq"] == 103
    assert v["badges"] == [badge] and not v["ok"]
    assert v["verify"].startswith("error: stream seq 103: ")


def test_an_altered_event_breaks_the_chain_at_the_next_seq() -> None:
    events = run_events("c")
    events[2] = {**events[2], "data": {**events[2]["data"], "exitCode": 9}}
    v = verdict([wrap_signed(e, SIGNER) for e in events])
    assert v["badges"] == ["broken chain at seq 3"] and not v["chainIntact"]
    assert "cellosprev does not match" in v["problem"]["reason"]
    missing = run_events("c")
    del missing[1]
    assert verdict([wrap_signed(e, SIGNER) for e in missing])["badges"] == ["broken chain at seq 2"]


def test_without_keys_the_chain_is_checked_but_nothing_authenticated() -> None:
    v = verdict(run_events("c"), keys=None)
    assert v["complete"] and not v["signed"]
    assert v["badges"][0].startswith("not authenticated")


def test_the_index_keeps_runs_apart() -> None:
    index = EvidenceIndex(KEYS)
    a, b = run_events("a"), run_events("b", exit_code=1)
    seq = 0
    for x, y in zip(a, b, strict=True):  # interleaved, as on the stream
        for event in (x, y):
            seq += 1
            cell = event["data"]["cellId"]
            assert index.feed(seq, wrap_signed(event, SIGNER), cell)
    assert not index.feed(seq, wrap_signed(a[0], SIGNER), "a")  # a redelivery
    assert not index.feed(seq + 1, {"junk": True}, None)
    for cell, events in (("a", a), ("b", b)):
        v = index.verdict(cell, events[0]["cellosrunid"])
        assert v is not None and v["ok"] and v["events"] == len(events)
    assert index.verdict("a", None) is None
    assert a[-1]["type"] == ev.COMPLIANCE_SUMMARY
