"""The side-by-side benchmark runs end to end in its tiny configuration (`--quick`): every
target and phase produces figures, and every request was answered 200. The `noop` target's addons
have TokenGate's shape. Its profiler summarises
folded stacks and samples a real process. Times are not asserted: they depend on the machine."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
from tokengate_core import pipeline
from tokengate_core.admission import AdmissionControl
from tokengate_core.gate import Gate
from tokengate_core.metering import Metering
from tokengate_core.quota import QuotaService
from tokengate_core.tools.children import Child

from scripts.bench import benchprofile, noop_addons
from scripts.bench.bench import markdown
from tests.support.processes import run_benchmark
from tests.support.redis_server import require_redis_server

TARGETS = {"direct", "mitmdump", "noop", "memory", "sqlite", "redis", "metrics"}


def test_quick_run_measures_every_target_and_phase():
    require_redis_server()
    report = run_benchmark("bench", "--quick", timeout=180)

    load = report["load"]
    assert (load["rounds"], load["concurrency"], load["truncated"]) == (1, [1, 2], False)
    assert set(load["targets"]) == TARGETS
    for name, target in load["targets"].items():
        assert target["startup_ms"] > 0 and target["rss_mib"] > 0, name
        assert set(target["levels"]) == {"1", "2"}, name
        for level, figures in target["levels"].items():
            assert (figures["requests"], figures["non_200"]) == (load["requests"], 0), (name, level)
            for key in ("rps", "p50_ms", "p99_ms", "rps_ratio", "p50_ms_ratio", "client_cpu_s"):
                assert figures[key] > 0, (name, level, key)
            assert figures["p50_ms"] <= figures["p99_ms"], (name, level)
            assert figures["cpu_ms"] >= 0, (name, level)  # /proc counts 10 ms ticks: may be 0
    assert all("cpu_ms_vs_memory" in f for f in load["targets"]["metrics"]["levels"].values())
    baseline = load["targets"]["mitmdump"]
    assert baseline["rss_mib_ratio"] == baseline["levels"]["1"]["rps_ratio"] == 1
    assert baseline["levels"]["1"]["added_p50_ms"] == 0

    stream = report["stream"]
    assert set(stream["targets"]) == TARGETS and not stream["truncated"]
    for name, figures in stream["targets"].items():
        assert (figures["requests"], figures["non_200"]) == (stream["requests"], 0), name
        assert 0 < figures["ttfb_p50_ms"] <= figures["ttfb_p99_ms"], name

    sizes = report["estimate"]["sizes"]
    assert list(sizes) == ["1000", "10000", "100000"]
    for size, figures in sizes.items():
        # Verified prompt size, plus the chat framing: 3 per message, 3 for the reply, the role.
        assert figures["text_tokens"] == int(size) and figures["estimate"] == int(size) + 7
        assert figures["ms"] > 0

    keys = report["keys"]
    assert set(keys["targets"]) == {"mitmdump", "memory", "sqlite"} and not keys["truncated"]
    for name, figures in keys["targets"].items():
        assert (figures["requests"], figures["non_200"]) == (keys["keys"], 0), name
        assert figures["rss_mib"] > 0 and figures["startup_ms"] > 0, name

    stores = report["stores"]
    assert stores["rounds"] == 1 and not stores["truncated"]
    for kind in ("memory", "sqlite", "redis"):
        for mode in ("sequential", "concurrent"):
            figures = stores["stores"][kind][mode]
            assert figures["reserve_us"] > 0 and figures["settle_us"] > 0, (kind, mode)
            assert figures["both_ratio_to_memory"] > 0, (kind, mode)

    dispatch = report["dispatch"]
    assert (dispatch["batches"], dispatch["truncated"]) == (10, False)
    assert dispatch["addons"] == len(pipeline.build(Gate()))
    assert set(dispatch["targets"]) == {"mitmdump", "noop"}
    assert all(figures["us_per_flow"] > 0 for figures in dispatch["targets"].values())
    assert dispatch["targets"]["noop"]["ratio"] > 0

    verdicts = {row["target"]: row for row in report["targets_met"]}
    throughput = verdicts["sqlite: req/s vs mitmdump at c=2"]  # a floor
    assert throughput["value"] == load["targets"]["sqlite"]["levels"]["2"]["rps_ratio"]
    assert throughput["met"] is (throughput["value"] >= throughput["limit"])
    estimate = verdicts["100,000-token estimate (ms)"]  # a ceiling
    assert estimate["value"] == sizes["100000"]["ms"]
    assert estimate["met"] is (estimate["value"] <= estimate["limit"])

    text = markdown(report)  # the README's tables come from the same report
    assert text.count("| --- |") == 8 and "TokenGate, Redis" in text


def test_profile_summary_counts_shares_by_function_and_entry(tmp_path):
    folded = tmp_path / "memory-0.folded"
    folded.write_text(
        "run (mitmproxy/master.py:10);request (tokengate_core/metering.py:40);"
        "estimate (tokengate_core/tokens.py:9) 30\n"
        "run (mitmproxy/master.py:10);write (asyncio/selector_events.py:1) 60\n"
        "run (mitmproxy/master.py:12);request (tokengate_core/metering.py:41);"
        "estimate (tokengate_core/tokens.py:12) 10\n"
        " 5\n",  # a thread outside Python code: no frames
        encoding="utf-8",
    )
    summary = benchprofile.summary([folded], requests=50)
    assert summary["samples"] == 105 and summary["tokengate_share"] == 40 / 105
    assert summary["busy_ms_per_request"] == 105 / benchprofile.RATE * 1000 / 50
    # Line numbers are dropped, so a function's samples add up wherever they landed in it.
    assert summary["top_functions"] == [
        ["write (asyncio/selector_events.py)", 60 / 105],
        ["estimate (tokengate_core/tokens.py)", 40 / 105],
        [benchprofile.NATIVE, 5 / 105],
    ]
    assert summary["top_tokengate_entries"] == [["request (tokengate_core/metering.py)", 40 / 105]]


def test_profile_samples_a_running_python_process(tmp_path):
    busy = "import time\nprint('listening at x:1', flush=True)\nend = time.time() + 30\n"
    busy += "while time.time() < end:\n    sum(range(1000))\n"
    child = Child([sys.executable, "-c", busy])
    output = tmp_path / "busy.folded"
    try:
        assert child.wait_ready(10)
        try:
            with benchprofile.sampled(child.popen.pid, output):
                time.sleep(1)
        except RuntimeError as e:
            if "ermission" in str(e):
                pytest.skip(f"py-spy may not attach to processes here: {e}")
            raise
    finally:
        child.stop()
    summary = benchprofile.summary([output], requests=1)
    assert summary["samples"] > 0 and summary["tokengate_share"] == 0
    assert summary["top_functions"][0][0].startswith("<module> (<string>)")


def test_noop_addons_mirror_the_pipeline_hook_for_hook():
    gate_addons = pipeline.build(Gate())
    assert len(noop_addons.addons) == len(gate_addons)
    for twin, addon in zip(noop_addons.addons, gate_addons, strict=True):
        assert noop_addons.shape(twin) == noop_addons.shape(addon), type(addon).__name__
    # Flow hooks are found, and told apart: admission reserves in an async hook, metering
    # settles in a sync one.
    gate = Gate()
    admission = noop_addons.shape(AdmissionControl(gate, QuotaService(gate)))
    metering = noop_addons.shape(Metering(gate, QuotaService(gate)))
    assert admission["request"] is True and metering["response"] is False
    assert {"requestheaders", "request", "error", "load", "configure"} <= set(admission)
    assert {"responseheaders", "response", "error"} <= set(metering)
    twin = noop_addons.noop_twin(AdmissionControl(gate, QuotaService(gate)))
    assert twin.error(None) is None
    assert asyncio.run(twin.request(None)) is None
