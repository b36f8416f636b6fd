"""A request that carries two different caller keys is refused; the same key twice is fine."""

from __future__ import annotations

import pytest
from mitmproxy.http import Headers
from tokengate_core import notes
from tokengate_core.keys import ConflictingKeys, caller_key

from tests.support.harness import reverse_flow, through
from tests.support.quotas import ALICE


def headers(sent: dict[str, str]) -> Headers:
    """Headers with their names as written (mitmproxy compares them case-insensitively)."""
    return Headers([(name.encode(), value.encode()) for name, value in sent.items()])


@pytest.mark.parametrize(
    "sent",
    [
        {"X-API-Key": ALICE},
        {"Authorization": f"Bearer {ALICE}"},
        {"Authorization": f"bearer  {ALICE} "},
        {"api-key": ALICE},  # Azure's form
        {"X-API-Key": ALICE, "Authorization": f"Bearer {ALICE}", "api-key": ALICE},
        {"X-API-Key": ALICE, "Authorization": "Basic dXNlcjpwYXNz"},  # not a key
        {"X-API-Key": ALICE, "api-key": " "},
    ],
)
def test_one_key_however_often_it_is_sent(sent):
    assert caller_key(headers(sent)) == ALICE


@pytest.mark.parametrize(
    ("sent", "named"),
    [
        (
            {"Authorization": "Bearer wrong", "X-API-Key": ALICE},
            ["X-API-Key", "Authorization: Bearer"],
        ),
        (
            {"api-key": "wrong", "Authorization": f"Bearer {ALICE}"},
            ["api-key", "Authorization: Bearer"],
        ),
        ({"X-API-Key": ALICE, "api-key": "wrong"}, ["X-API-Key", "api-key"]),
    ],
)
def test_two_different_keys_are_a_conflict_naming_the_headers(sent, named):
    with pytest.raises(ConflictingKeys) as raised:
        caller_key(headers(sent))
    assert raised.value.headers == named
    assert ALICE not in str(raised.value) and "wrong" not in str(raised.value)


def test_no_key_is_none():
    assert caller_key(Headers()) is None
    assert caller_key(Headers(authorization="Bearer ")) is None


async def test_the_gate_answers_401_to_two_different_keys(gate_addons):
    _, _, addons = gate_addons
    flow = reverse_flow(key="wrong")
    flow.request.headers["X-API-Key"] = ALICE
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response is not None and flow.response.status_code == 401
    assert notes.answered_by_gate(flow)
    message = flow.response.json()["error"]["message"]
    assert "Different API keys were sent in X-API-Key, Authorization: Bearer" in message
    assert ALICE not in message and "wrong" not in message
    # Neither key goes anywhere: the caller's credentials are stripped as on every governed flow.
    assert ALICE not in str(flow.request.headers) and "Bearer wrong" not in str(
        flow.request.headers
    )


@pytest.mark.parametrize("second", ["X-API-Key", "api-key"])
async def test_the_gate_admits_the_same_key_sent_twice(gate_addons, second):
    _, _, addons = gate_addons
    flow = reverse_flow()
    flow.request.headers[second] = ALICE
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response is None, flow.response and flow.response.text
    assert notes.of(flow)["key"] == "alice"
    assert second not in flow.request.headers  # stripped before it leaves


async def test_the_gate_admits_azures_api_key_header(gate_addons):
    _, _, addons = gate_addons
    flow = reverse_flow(key=None)
    flow.request.headers["api-key"] = ALICE
    await through(addons, ("requestheaders", "request"), flow)
    assert flow.response is None, flow.response and flow.response.text
    assert notes.of(flow)["key"] == "alice"
    assert "api-key" not in flow.request.headers
