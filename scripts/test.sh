#!/usr/bin/env bash
# Install what is needed and run the whole test suite, then the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy --strict src
exec .venv/bin/pytest -q "$@"
