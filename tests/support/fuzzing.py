"""What the addon-level fuzz tests share: the harness they drive and the odd JSON values they
draw."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import strategies as st
from tokengate_core.admission import AdmissionControl
from tokengate_core.credentials import CredentialSwap
from tokengate_core.gate import Gate
from tokengate_core.metering import Metering


@dataclass(repr=False)  # a failing case prints its arguments: not the gate's whole config
class Harness:
    loop: asyncio.AbstractEventLoop
    gate: Gate
    addons: list
    admission: AdmissionControl
    metering: Metering
    swap: CredentialSwap
    now: list[float]
    cases: int = 0
    exact: int = 0  # cases whose charge was checked against the provider's figures
    # Forwarded flows that came with each credential header: the check that the header is gone
    # from what leaves means something only where it was there.
    forwarded_with: Counter = field(default_factory=Counter)

    def run(self, coro):
        return self.loop.run_until_complete(coro)


odd_numbers = st.one_of(
    st.none(),
    st.integers(-5, 200),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
short_text = st.text(max_size=40)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), short_text)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=10,
)
