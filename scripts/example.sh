#!/usr/bin/env bash
# Install what is needed and run examples/hello.yaml: prints the workload's output, the run's
# signed events (verified) and the exported artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
out=build/example
rm -rf "$out" && mkdir -p "$out"
.venv/bin/cellos keygen --kid example --out-dir "$out" >/dev/null

export CELLOS_EXPORT_DIR="$PWD/$out/exports"
export CELL_OS_JSONL_EVENTS="$PWD/$out/events.jsonl"
export CELLOS_EVENT_SIGNING=ed25519 CELLOS_EVENT_SIGNING_KID=example
CELLOS_EVENT_SIGNING_KEY_BASE64="$(cat "$out/example.key")"
export CELLOS_EVENT_SIGNING_KEY_BASE64

echo "== workload output"
.venv/bin/cellos-supervisor examples/hello.yaml
echo "== events ($CELL_OS_JSONL_EVENTS)"
.venv/bin/python - "$CELL_OS_JSONL_EVENTS" <<'PY'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    inner = json.loads(line)["data"]["event"]
    data = {k: v for k, v in inner["data"].items() if k not in ("cellId", "resources")}
    print(f'{inner["cellosseq"]:>2} {inner["type"].removeprefix("dev.cellos.events.cell.")} '
          f'{json.dumps(data, separators=(",", ":"))[:150]}')
PY
echo "== verify"
.venv/bin/cellos events verify "$CELL_OS_JSONL_EVENTS" --keys "$out/example.verify-keys.json"
echo "== exported artifact ($CELLOS_EXPORT_DIR/hello/hello.txt)"
cat "$CELLOS_EXPORT_DIR/hello/hello.txt"
