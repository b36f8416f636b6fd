"""The store benchmark runs end to end and reports every store; timings are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.e2e import ROOT
from tests.redis_server import require_redis_server


def test_tiny_run_reports_every_store():
    require_redis_server()
    tiny = ["--requests", "20", "--rounds", "2", "--concurrency", "4", "--max-seconds", "25"]
    run = subprocess.run(
        [sys.executable, "-m", "scripts.bench_stores", *tiny, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["rounds"] == 2 and not report["truncated"]
    for mode in ("sequential", "concurrent"):
        stores = report["stores"][mode]
        assert set(stores) == {"memory", "sqlite", "redis"}
        assert stores["memory"]["ratio_to_memory"] == 1
        for kind, figures in stores.items():
            assert figures["us_per_request"] > 0 and figures["ratio_to_memory"] > 0, kind
