"""The web console in a real browser: Debian's headless Chromium driven by Selenium (through
Debian's chromedriver: nothing is downloaded), against a real ``cellos serve``, a real
nats-server and a real ``cellos worker`` (stub backend: the workload is a host process).

Screenshots of the main views are written to ``build/console-screenshots/``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellos.core import events as ev
from cellos.core.chain import RunChain
from cellos.core.signing import Ed25519Signer, wrap_signed
from cellos.core.subjects import event_subject
from tests.conftest import REPO, doc, require_host
from tests.test_server import TOKEN, Serve, World, signed_world

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = REPO / "build" / "console-screenshots"
XSS = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with signed_world(tmp_path_factory.mktemp("console")) as w:
        yield w


@pytest.fixture(scope="module")
def serve(world: World) -> Iterator[Serve]:
    server = Serve(world, "--keys", str(world.keys))
    server.start()
    worker = subprocess.Popen(
        [sys.executable, "-m", "cellos.cli", "worker", "--concurrency", "2"],
        env=world.env,
        stdout=subprocess.DEVNULL,
        stderr=(world.root / "worker.log").open("ab"),
    )
    try:
        yield server
    finally:
        worker.terminate()
        worker.wait(20)
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def browser(serve: Serve) -> Iterator[Any]:
    ok = Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()
    require_host(ok, "chromium and chromium-driver (Debian packages; scripts/setup.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--no-first-run",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(30)
    try:
        driver.get(serve.url + "/")
        driver.find_element("id", "token").send_keys(TOKEN)
        driver.find_element("css selector", "#login-form button").click()
        wait_for(driver, lambda d: d.find_element("id", "cells-table").get_attribute("data-ready"))
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Any, timeout: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def shot(driver: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def row_state(driver: Any, cell_id: str) -> str | None:
    return driver.execute_script(
        "const r = document.querySelector(`tr[data-cell-id='${arguments[0]}']`);"
        "return r ? r.dataset.state : null;",
        cell_id,
    )


def badge(driver: Any, cell_id: str) -> str:
    return str(
        driver.execute_script(
            "const r = document.querySelector(`tr[data-cell-id='${arguments[0]}']`);"
            "return r ? r.cells[8].textContent : '';",
            cell_id,
        )
    )


# --- publishing hand-built runs straight to JetStream (the supervisor's wire format) -------


def signer(world: World) -> Ed25519Signer:
    seed = world.env["CELLOS_EVENT_SIGNING_KEY_BASE64"]
    return Ed25519Signer("api-key", base64.urlsafe_b64decode(seed + "=" * (-len(seed) % 4)))


def publish(world: World, events: list[dict[str, Any]], pace: float = 0.0) -> float:
    """Publish wire events in order (``pace`` seconds apart); the rate achieved (events/s)."""
    import nats

    async def go() -> float:
        nc = await nats.connect(world.nats.url)
        js = nc.jetstream()
        started = time.monotonic()
        for i, event in enumerate(events):
            inner = event["data"]["event"] if event["type"] == ev.SIGNED_ENVELOPE else event
            cell = inner["subject"].rsplit(":", 1)[-1]
            await js.publish(event_subject(None, cell, "x"), json.dumps(event).encode())
            if pace:
                await asyncio.sleep(max(0.0, started + (i + 1) * pace - time.monotonic()))
        elapsed = time.monotonic() - started
        await nc.close()
        return len(events) / elapsed if elapsed > 0 else float("inf")

    return asyncio.run(go())


def stamp(chain: RunChain, kind: str, cell: str, data: dict[str, Any]) -> dict[str, Any]:
    return chain.stamp(ev.new_event(kind, cell, {"cellId": cell, **data}, host="h"))


# --- the tests ---------------------------------------------------------------------------


def test_submit_watch_live_and_see_the_evidence(world: World, serve: Serve, browser: Any) -> None:
    d = browser
    # Validation errors per JSON path, nothing queued.
    d.get(serve.url + "/#/submit")
    area = d.find_element("id", "document")
    area.send_keys(
        json.dumps(
            {
                "apiVersion": "cellos.io/v1",
                "kind": "ExecutionCell",
                "spec": {"id": "bad id!", "run": {"argv": []}},
            }
        )
    )
    d.find_element("css selector", "#submit-form button").click()
    wait_for(d, lambda d: d.find_element("id", "submit-errors").is_displayed())
    paths = [e.text for e in d.find_elements("css selector", "#submit-errors tbody td:first-child")]
    assert any(p.startswith("spec.id") for p in paths), paths
    shot(d, "submit-errors")

    # A real cell: a hostile label and hostile output, shown as text.
    script = f"printf '%s\\n' {json.dumps(XSS)}; sleep 2; echo second-line"
    document = doc(
        "console-live-1",
        argv=["/bin/sh", "-c", script],
        correlation={"tenantId": "acme", "labels": {"note": XSS}},
    )
    area.clear()
    area.send_keys(json.dumps(document))
    d.find_element("css selector", "#submit-form button").click()
    wait_for(d, lambda d: "Queued" in d.find_element("id", "submit-result").text)

    d.get(serve.url + "/#/")
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = row_state(d, "console-live-1")
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        if state == "COMPLETED":
            break
        time.sleep(0.05)
    assert "RUNNING" in seen and seen[-1] == "COMPLETED", seen
    assert seen.index("RUNNING") < seen.index("COMPLETED")
    wait_for(d, lambda d: "complete" in badge(d, "console-live-1"))
    assert badge(d, "console-live-1") == "signed by api-key · chain intact · complete"
    shot(d, "cells")

    # Filters: by state and by tenant.
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    Select(d.find_element("id", "filter-state")).select_by_visible_text("FAILED")
    assert not d.find_element("css selector", "tr[data-cell-id='console-live-1']").is_displayed()
    Select(d.find_element("id", "filter-state")).select_by_visible_text("any")
    d.find_element("id", "filter-tenant").send_keys("acme")
    assert d.find_element("css selector", "tr[data-cell-id='console-live-1']").is_displayed()
    d.find_element("id", "filter-tenant").clear()
    d.find_element("id", "filter-tenant").send_keys(" ")
    # Keyboard: Tab reaches the cell's link from the tenant filter; Enter opens it.
    for _ in range(40):
        d.switch_to.active_element.send_keys(Keys.TAB)
        if d.switch_to.active_element.text == "console-live-1":
            break
    assert d.switch_to.active_element.text == "console-live-1"
    d.switch_to.active_element.send_keys(Keys.ENTER)
    wait_for(d, lambda d: "second-line" in d.find_element("id", "log-stdout").text)
    assert XSS in d.find_element("id", "log-stdout").text
    timeline = d.find_element("id", "timeline").text
    assert XSS.replace('"', '\\"') in timeline  # the label, as JSON text
    assert d.find_elements("css selector", "img, script:not([src])") == []
    assert d.title == "CellOS console"
    d.find_element("id", "verify-button").click()
    wait_for(d, lambda d: d.find_element("id", "verify-result").text.startswith("ok:"))
    assert d.find_element("id", "cell-evidence").text.startswith("signed by api-key")
    assert d.find_element("id", "isolation").text  # the backend's isolation entries
    shot(d, "cell")


#: Holds the response of the next POST in the page until the row of cell ``arguments[0]`` shows
#: COMPLETED (at most 60 s), so that the page reads it after the live stream's updates.
HOLD_SUBMIT_RESPONSE = """
const cellId = arguments[0];
window.__realFetch = window.__realFetch || window.fetch;
window.fetch = async (path, options) => {
  const response = await window.__realFetch(path, options);
  if (options && options.method === "POST") {
    const done = () => {
      const row = document.querySelector(`tr[data-cell-id='${cellId}']`);
      return row && row.dataset.state === "COMPLETED";
    };
    for (let i = 0; i < 1200 && !done(); i++) await new Promise((r) => setTimeout(r, 50));
  }
  return response;
};
"""


def test_a_late_submit_response_does_not_undo_the_stream(
    world: World, serve: Serve, browser: Any
) -> None:
    """The response to a submission says what the cell was when the server took it
    (PENDING). When the page reads it after the live stream has shown newer states, the row
    keeps them: before this was mended the row went back to PENDING (or ADMITTED) for good,
    and the live test above saw ['ADMITTED', 'COMPLETED'] about once in ten runs under load."""
    d = browser
    d.get(serve.url + "/#/submit")
    d.execute_script(HOLD_SUBMIT_RESPONSE, "console-late-1")
    try:
        area = d.find_element("id", "document")
        area.clear()
        area.send_keys(json.dumps(doc("console-late-1")))
        d.find_element("css selector", "#submit-form button").click()
        # "Queued" is written as the page reads the response, i.e. after the row completed.
        wait_for(d, lambda d: "Queued" in d.find_element("id", "submit-result").text, 90)
        states: list[str | None] = []

        def completed(d: Any) -> bool:
            states.append(row_state(d, "console-late-1"))
            return states[-1] == "COMPLETED"

        from selenium.common.exceptions import TimeoutException

        try:
            # Settled at once when mended; a few seconds of slack for a slow stream.
            wait_for(d, completed, 10)
        except TimeoutException:
            pytest.fail(f"the row went back and stayed there: {states[-3:]}")
    finally:
        d.execute_script("if (window.__realFetch) window.fetch = window.__realFetch;")


def test_a_tampered_run_shows_the_broken_chain_at_its_seq(
    world: World, serve: Serve, browser: Any
) -> None:
    chain, cell = RunChain(), "tampered-1"
    events = [
        stamp(chain, ev.LIFECYCLE_STARTED, cell, {"backend": "stub"}),
        stamp(chain, ev.PROCESS_SPAWNED, cell, {"program": "/bin/true", "argc": 1}),
        stamp(chain, ev.COMMAND_COMPLETED, cell, {"exitCode": 0}),
        stamp(
            chain,
            ev.LIFECYCLE_DESTROYED,
            cell,
            {"outcome": "succeeded", "exitCode": 0, "terminalState": "clean"},
        ),
        stamp(
            chain,
            ev.COMPLIANCE_SUMMARY,
            cell,
            {"outcome": "succeeded", "exitCode": 0, "terminalState": "clean"},
        ),
    ]
    # Someone with the key rewrites the exit code of seq 2 and signs it again: its signature
    # verifies, but seq 3's cellosprev no longer matches.
    events[2] = {**events[2], "data": {**events[2]["data"], "exitCode": 1}}
    sign = signer(world)
    publish(world, [wrap_signed(e, sign) for e in events])
    d = browser
    d.get(serve.url + "/#/")
    wait_for(d, lambda d: "broken chain" in badge(d, cell))
    assert badge(d, cell) == "broken chain at seq 3"
    shot(d, "cells-evidence")
    d.find_element("link text", cell).click()
    d.find_element("id", "verify-button").click()
    wait_for(d, lambda d: d.find_element("id", "verify-result").text.startswith("error:"))
    assert "cellosprev does not match" in d.find_element("id", "verify-result").text
    shot(d, "tampered")


def test_a_thousand_cells_and_fifty_updates_per_second(
    world: World, serve: Serve, browser: Any
) -> None:
    sign = signer(world)
    chains = {f"bulk-{i:04d}": RunChain() for i in range(1000)}
    first = [
        wrap_signed(stamp(c, ev.LIFECYCLE_STARTED, cid, {"backend": "stub"}), sign)
        for cid, c in chains.items()
    ]
    publish(world, first)
    d = browser
    d.get(serve.url + "/#/")
    d.refresh()  # a fresh page: the snapshot of every cell in one event
    started = time.monotonic()
    wait_for(
        d,
        lambda d: int(d.find_element("id", "cells-table").get_attribute("data-cells") or 0) >= 1000,
    )
    render_s = time.monotonic() - started
    before = int(d.find_element("id", "cells-table").get_attribute("data-updates") or 0)
    updated = list(chains)[:200]
    spawned = [
        wrap_signed(stamp(chains[cid], ev.PROCESS_SPAWNED, cid, {"argc": 1}), sign)
        for cid in updated
    ]
    rate = publish(world, spawned, pace=1 / 50)
    wait_for(
        d,
        lambda d: (
            int(d.find_element("id", "cells-table").get_attribute("data-updates") or 0)
            >= before + len(updated)
        ),
    )
    states = d.execute_script(
        "return arguments[0].map(id => document.querySelector(`tr[data-cell-id='${id}']`)"
        ".dataset.state);",
        updated,
    )
    after = int(d.find_element("id", "cells-table").get_attribute("data-updates") or 0)
    print(
        f"console: 1000 cells rendered in {render_s:.2f} s; {len(updated)} updates at "
        f"{rate:.1f}/s, {after - before} received"
    )
    assert rate >= 45
    assert after - before == len(updated)  # none dropped, none duplicated
    assert set(states) == {"RUNNING"}
    shot(d, "cells-1000")


def test_static_files_are_open_data_is_not(serve: Serve) -> None:
    from tests.test_server import assert_problem, http

    for path in ("/", "/console/console.js", "/console/console.css"):
        with urllib.request.urlopen(serve.url + path, timeout=10) as response:
            assert response.status == 200
            csp = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp
            assert "unsafe-inline" not in csp
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            body = response.read().decode()
        assert TOKEN not in body
    page = (REPO / "src/cellos/server/console/static/index.html").read_text()
    assert "<script>" not in page and " on" not in page.replace("\n", " ").split("<body")[0]
    script = (REPO / "src/cellos/server/console/static/console.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "EventSource" not in script.split('"use strict"')[1]  # tokens never in URLs
    assert_problem(http(serve, "/console/../app.py", token=None), 404)
    assert_problem(http(serve, "/console/nothing.js", token=None), 404)
    for path in ("/v1/console/stream", "/v1/cells/x/runs/y/verdict"):
        assert_problem(http(serve, path, token=None), 401)
    assert_problem(http(serve, "/v1/cells/no-such/runs/y/verdict"), 404)
    assert_problem(http(serve, "/v1/console/stream?x=1"), 400)


def test_network_decisions_and_artifacts_are_tables_of_text(
    world: World, serve: Serve, browser: Any
) -> None:
    chain, cell = RunChain(), "netrun-1"
    isolation = ["ns:net", "network:egress-allowlist"]
    sha = "ab" * 32
    events = [
        stamp(chain, ev.LIFECYCLE_STARTED, cell, {"backend": "cellos", "isolation": isolation}),
        stamp(
            chain,
            ev.DNS_QUERY_REFUSED,
            cell,
            {"qname": XSS, "decision": "refused", "reasonCode": "dns_name_not_allowed"},
        ),
        stamp(
            chain,
            ev.L7_EGRESS_DECISION,
            cell,
            {"decision": "allowed", "host": "example.org", "reasonCode": "l7_sni_allowlist_match"},
        ),
        stamp(
            chain,
            ev.NETWORK_FLOW_DECISION,
            cell,
            {"decision": "dropped", "packets": 3, "bytes": 180, "rule": "drop-rest"},
        ),
        stamp(
            chain,
            ev.EXPORT_COMPLETED,
            cell,
            {
                "name": "report",
                "path": "/out/r.json",
                "destination": "s3://b/r.json",
                "sizeBytes": 1234,
                "sha256": sha,
            },
        ),
        stamp(
            chain,
            ev.LIFECYCLE_DESTROYED,
            cell,
            {"outcome": "succeeded", "exitCode": 0, "terminalState": "clean"},
        ),
        stamp(
            chain,
            ev.COMPLIANCE_SUMMARY,
            cell,
            {"outcome": "succeeded", "exitCode": 0, "terminalState": "clean"},
        ),
    ]
    publish(world, [wrap_signed(e, signer(world)) for e in events])
    d = browser
    d.get(serve.url + f"/#/cell/{cell}")
    wait_for(d, lambda d: len(d.find_elements("css selector", "#network tbody tr")) == 3)
    rows = [r.text for r in d.find_elements("css selector", "#network tbody tr")]
    assert "refused" in rows[0] and XSS in rows[0]
    assert "allowed" in rows[1] and "dropped" in rows[2]
    artifacts = d.find_element("css selector", "#artifacts tbody").text
    assert "report" in artifacts and "1234" in artifacts and sha in artifacts
    assert "network:egress-allowlist" in d.find_element("id", "isolation").text
    assert d.find_elements("css selector", "img") == [] and d.title == "CellOS console"
    shot(d, "network")
