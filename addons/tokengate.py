"""TokenGate: `mitmdump -s addons/tokengate.py` turns mitmproxy into an LLM gateway.

This script only assembles the addons; the implementation is the `tokengate_core` package.
"""

from tokengate_core import pipeline
from tokengate_core.gate import Gate

addons = pipeline.build(Gate())
