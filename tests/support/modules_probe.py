"""A mitmdump script for tests: after each answer, logs whether named modules are loaded.

    mitmdump ... -s addons/tokengate.py -s tests/support/modules_probe.py \\
        --set probe_modules=genai_prices,pydantic

Each response logs one line, `probe: genai_prices=False pydantic=False`, after TokenGate's
own hooks for that flow have run (scripts run in the order they are given).
"""

from __future__ import annotations

import logging
import sys

from mitmproxy import ctx, http


class ModulesProbe:
    def load(self, loader) -> None:
        loader.add_option("probe_modules", str, "", "Comma-separated module names to report.")

    def response(self, flow: http.HTTPFlow) -> None:
        names = [name for name in ctx.options.probe_modules.split(",") if name]
        found = " ".join(f"{name}={name in sys.modules}" for name in names)
        logging.info("probe: %s", found)


addons = [ModulesProbe()]
