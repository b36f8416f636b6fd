"""`python -m scripts.bench.prices`: what money costs the gate.

What importing the bundled price table (genai-prices, with pydantic) adds to a process that has
mitmproxy and TokenGate loaded already, in resident memory and time; genai-prices' own
`calc_price` per call; and TokenGate's per-request path, a cached `PriceBook.price` lookup plus
the integer `cost`, per call. Takes about a second.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import UTC, datetime

import mitmproxy.http  # noqa: F401 (loaded first: the figure is what a running gate gains)
from tokengate_core import pipeline  # noqa: F401
from tokengate_core.limiter import Usage
from tokengate_core.prices import PriceBook, cost

MODEL = "gpt-4o"


def resident_mb() -> float:
    """Resident memory now (Linux), else the peak so far (macOS: ru_maxrss is in bytes)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for text in status:
                if text.startswith("VmRSS:"):
                    return int(text.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20 if sys.platform == "darwin" else 1 << 10)


def per_call_us(function, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


def measure(calls: int) -> dict[str, float | str]:
    before, start = resident_mb(), time.perf_counter()
    PriceBook.load()
    import genai_prices

    import_seconds = time.perf_counter() - start
    imported_mb = resident_mb() - before
    theirs = genai_prices.Usage(input_tokens=1000, cache_read_tokens=200, output_tokens=500)
    moment = datetime.now(UTC)
    genai_prices.calc_price(theirs, MODEL, genai_request_timestamp=moment)  # its caches warm
    calc_us = per_call_us(
        lambda: genai_prices.calc_price(theirs, MODEL, genai_request_timestamp=moment), calls
    )
    book, usage = PriceBook(), Usage(1000, 500, cached_prompt=200)
    start = time.perf_counter()
    book.price(MODEL)
    first_us = (time.perf_counter() - start) * 1e6
    ours_us = per_call_us(lambda: cost(usage, book.price(MODEL)), calls * 50)
    return {
        "genai_prices": genai_prices.__version__,
        "import_mb": round(imported_mb, 1),
        "import_s": round(import_seconds, 2),
        "calc_price_us": round(calc_us, 1),
        "first_lookup_us": round(first_us, 1),
        "lookup_and_cost_us": round(ours_us, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.prices", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calc_price calls (ours: 50x)")
    parser.add_argument("--json", action="store_true", help="JSON for machines")
    args = parser.parse_args(argv)
    figures = measure(args.calls)
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"genai-prices {figures['genai_prices']}")
    print(
        f"import of the table: +{figures['import_mb']} MB resident, {figures['import_s']} s "
        "(a gate with no budget never pays it)"
    )
    print(f"genai_prices.calc_price: {figures['calc_price_us']} µs a call")
    print(f"PriceBook.price, first lookup of a model: {figures['first_lookup_us']} µs")
    print(f"PriceBook.price (cached) + cost: {figures['lookup_and_cost_us']} µs a call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
