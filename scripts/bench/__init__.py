"""Benchmark, soak and profiling tools, run from the repository root as modules:

    .venv/bin/python -m scripts.bench [...]              # throughput, latency, CPU, memory
    .venv/bin/python -m scripts.bench.bench_burst [...]  # a burst of concurrent requests at a limit
    .venv/bin/python -m scripts.bench.soak [...]         # memory over a long run

`noop_addons.py` and `memtrace.py` are mitmproxy scripts they load into mitmdump with `-s`.
"""
