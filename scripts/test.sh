#!/usr/bin/env bash
# Sets up everything the tests need, then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
scripts/ensure_redis.sh
.venv/bin/ruff check .
# Two workers (one per core of the machines CI runs on), each test module whole on one of them
# so that its shared gateway starts once; TOKENGATE_TEST_WORKERS=0 runs in this process.
exec .venv/bin/python -m pytest -n "${TOKENGATE_TEST_WORKERS:-2}" --dist loadfile "$@"
