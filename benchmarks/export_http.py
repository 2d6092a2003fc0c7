"""HTTP export throughput: ``HttpExportSink`` vs a bare ``curl -T`` to the same server.

Both PUT the same artifact (default 100 MiB) to the same server (tests/http_put_server.py, in
its own process, hashing every body it receives). The export sink's sample includes all it
does for one artifact: the sha256 first pass, the PUT with Content-Length and digest headers
and the wait for the server's answer. Rounds are interleaved and shuffled (harness.py).
Acceptance: export throughput >= 0.5x curl's, i.e. p50 time <= 2x curl's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness

CURL = "curl -T"
EXPORT = "HttpExportSink"
THROUGHPUT_MIN = 0.5


@dataclasses.dataclass(frozen=True)
class Config:
    rounds: int
    warmup: int
    seed: int
    size: int


def _server() -> tuple[subprocess.Popen[str], str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(harness.REPO), str(harness.REPO / "src")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.http_put_server"],
        cwd=harness.REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        proc.wait()
        raise harness.BenchError("the PUT server did not start")
    return proc, url


def benchmark(config: Config) -> dict[str, Any]:
    harness.ensure_cellos_importable()
    from cellos.exports.http import HttpExportSink

    if shutil.which("curl") is None:
        raise harness.BenchError("curl is not installed")
    server, url = _server()
    try:
        with harness.scratch("export-bench-") as tmp_name:
            artifact = Path(tmp_name) / "artifact.bin"
            with artifact.open("wb") as out:
                left = config.size
                while left > 0:
                    out.write(os.urandom(min(left, 1 << 20)))
                    left -= min(left, 1 << 20)
            sink = HttpExportSink(url + "/bench")
            counter = iter(range(10**9))

            def export() -> None:
                with artifact.open("rb") as source:
                    sink.export("bench-cell", f"a{next(counter)}.bin", source)

            curl_argv = ["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(artifact)]

            def curl() -> None:
                harness.run_checked([*curl_argv, f"{url}/curl/c{next(counter)}.bin"], CURL)

            rows = [harness.Series(CURL), harness.Series(EXPORT)]
            harness.run_rounds(
                config.rounds,
                config.warmup,
                [harness.timed(rows[0], curl), harness.timed(rows[1], export)],
                random.Random(config.seed),
            )
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
    rates = {
        s.name: config.size / (harness.p50(s.samples) / 1e9) / 1e6 if s.samples else None
        for s in rows
    }
    return {
        "benchmark": "cellos.export_http",
        "config": dataclasses.asdict(config),
        "host": harness.host_info(),
        "throughput": {"rows": harness.ratio_rows(rows, rows[0]), "MB_per_s_p50": rates},
        "acceptance": [
            harness.acceptance(
                f"{EXPORT} throughput >= {THROUGHPUT_MIN:g}x {CURL} "
                f"(time <= {1 / THROUGHPUT_MIN:g}x)",
                rows[1],
                rows[0],
                1 / THROUGHPUT_MIN,
            )
        ],
    }


def show(report: dict[str, Any]) -> None:
    cfg = report["config"]
    print(f"HTTP export: {cfg['size']} bytes per PUT, {cfg['rounds']}+{cfg['warmup']} rounds")
    for line in harness.ratio_table(report["throughput"]["rows"], CURL):
        print("  " + line)
    for name, rate in report["throughput"]["MB_per_s_p50"].items():
        print(f"  {name}: {rate:.0f} MB/s at p50" if rate else f"  {name}: n/a")
    for acc in report["acceptance"]:
        print(harness.acceptance_line(acc))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_round_options(parser, rounds=8, warmup=1)
    parser.add_argument("--size", type=harness.nonnegative, default=100 << 20)
    args = parser.parse_args(argv)
    config = Config(args.rounds, args.warmup, args.seed, args.size)
    return harness.emit(lambda: benchmark(config), args.json, show)


if __name__ == "__main__":
    sys.exit(main())
