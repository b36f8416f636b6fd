"""TokenGate: `mitmdump -s addons/tokengate.py` turns mitmproxy into an LLM gateway.

This script only assembles the addons; the implementation lives in the `tokengate_core` package.
Order matters: each flow hook runs through these addons in this order.
"""

from tokengate_core.admission import Authenticator, Router
from tokengate_core.annotate import Annotator
from tokengate_core.credentials import CredentialSwap
from tokengate_core.metering import Metering
from tokengate_core.settings import Gate, Settings

gate = Gate()

addons = [
    Settings(gate),
    Router(gate),
    Authenticator(gate),
    CredentialSwap(gate),
    Metering(gate),
    Annotator(),
]
