#!/usr/bin/env bash
# Sets up everything the tests need, then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
scripts/ensure_redis.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
