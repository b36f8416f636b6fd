"""The ledger's money fields: the sub-counts providers price apart, and the call's cost where the
gate priced it, exact."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import tflow, tutils
from tokengate_core import notes
from tokengate_core.audit import entry
from tokengate_core.reporting import Reporting

from tests.support.harness import reverse_flow, through

DETAILED = {
    "service_tier": "flex",
    "usage": {
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "prompt_tokens_details": {"cached_tokens": 200},
        "completion_tokens_details": {"reasoning_tokens": 300},
    },
}


@pytest.fixture
def ledger(gate_addons, tmp_path):
    tctx, _, addons = gate_addons
    (addon,) = [a for a in addons if isinstance(a, Reporting)]
    path = tmp_path / "ledger.jsonl"
    tctx.configure(addon, tokengate_ledger=str(path))
    addon.running()
    return addon, path


async def test_a_line_carries_the_sub_counts_and_no_cost_without_a_budget(gate_addons, ledger):
    _, _, addons = gate_addons
    addon, path = ledger
    flow = reverse_flow()
    await through(addons, ("requestheaders", "request"), flow)
    flow.response = tutils.tresp(content=json.dumps(DETAILED).encode())
    await through(addons, ("responseheaders", "response"), flow)
    addon.done()
    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (1000, 500)
    assert (line["cached_prompt_tokens"], line["cache_write_tokens"]) == (200, 0)
    assert line["reasoning_tokens"] == 300
    assert line["service_tier"] == "flex"
    assert "cost_usd" not in line  # the proxy has no budget: the gate did not price the call


@pytest.mark.parametrize(
    ("micro", "text"), [(7250, "0.00725"), (1, "1e-06"), (12_345_678_901, "12345.678901")]
)
def test_the_cost_is_written_in_dollars_exactly(micro, text):
    flow = tflow.tflow(resp=True)
    state = notes.start(flow, proxy="p", key="k", cost_micro_usd=micro)
    line = json.loads(json.dumps(entry(flow, state, 200, "admitted")))
    assert json.dumps(line["cost_usd"]) == text
    assert round(line["cost_usd"] * 1_000_000) == micro


def test_a_line_of_an_older_capture_has_zero_sub_counts():
    flow = tflow.tflow(resp=True)
    usage = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10, "source": "reported"}
    state = notes.start(flow, proxy="p", key="k", usage=usage)
    line = entry(flow, state, 200, "admitted")
    assert "service_tier" not in line
    assert (line["cached_prompt_tokens"], line["cache_write_tokens"], line["reasoning_tokens"]) == (
        0,
        0,
        0,
    )
