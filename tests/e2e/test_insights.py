"""End to end: the ledger, the usage endpoint, the report and QA replay, with real processes.

One capture per module, made by `tokengate-capture` (a real mitmdump with TokenGate saving flows
in front of the real mock), backs the replay tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
from mitmproxy import io
from tokengate_core.keys import hash_key

from tests.support.calls import call
from tests.support.captures import CAPTURED, ledger, read_flows, replay, secrets_of
from tests.support.processes import MITMDUMP, PROVIDER_KEY, ROOT, write_quotas
from tests.support.quotas import ALICE, key_entries, proxy_yaml


def test_live_ledger_has_one_line_per_governed_request(captured):
    lines = ledger(captured.ledger)
    assert [line["status"] for line in lines] == CAPTURED
    assert [line["decision"] for line in lines] == [
        "admitted", "refused", "unauthorized", "admitted",
        "admitted", "admitted", "admitted", "answered",
    ]  # fmt: skip
    first, refused, anonymous, stream, _, embedding, failed, usage = lines
    assert first["time"].endswith("Z") and len(first["time"]) == len("2026-11-29T14:03:07.123Z")
    assert (first["proxy"], first["key"], first["model"]) == ("qa", "alice", "gpt-4o-mini")
    # Which secret of that name: its fingerprint, as `tokengate-keys list` matches it.
    assert first["key_fp"] == hash_key(captured.caller_keys["alice"])[:16]
    assert first["total_tokens"] == first["prompt_tokens"] + first["completion_tokens"] > 100
    assert first["usage_source"] == "reported" and first["reserved"] == 100
    assert first["remaining"] == {"total_tokens-1m": 0}
    assert first["limits"] == {"total_tokens-1m": 100}
    assert first["latency_ms"] > 0
    assert refused["limit"] == "total_tokens-1m" and refused["total_tokens"] == 0
    assert anonymous["key"] is None and anonymous["proxy"] is None and anonymous["key_fp"] is None
    assert stream["stream"] is True and stream["usage_source"] == "reported"
    assert stream["total_tokens"] == 14
    assert embedding["endpoint"] == "embeddings" and embedding["completion_tokens"] == 0
    assert failed["total_tokens"] == 0 and failed["usage_source"] is None
    assert usage["endpoint"] == "tokengate/usage"
    assert usage["remaining"] == {"total_tokens-1m": 100 - 14 - embedding["total_tokens"]}
    text = captured.ledger.read_bytes()
    assert not any(secret in text for secret in secrets_of(captured))


def test_saved_capture_holds_no_secret_and_the_urls_that_were_called(captured):
    saved = captured.flows.read_bytes()
    assert not any(secret in saved for secret in secrets_of(captured))
    flows = read_flows(captured.flows)
    assert [flow.response.status_code for flow in flows] == CAPTURED
    # A flow shows the URL it was sent to; one the gate answered, the URL its caller used
    # (either way `-C` routes it again: see the client replay test).
    by_gate = [bool(flow.metadata["tokengate"].get("answered_by_gate")) for flow in flows]
    assert by_gate == [False, True, True, False, False, False, False, True]
    for flow, answered in zip(flows, by_gate, strict=True):
        assert flow.request.path.startswith("/qa/" if answered else "/v1/"), flow.request.path
    assert flows[0].comment.startswith("tokengate: qa/alice gpt-4o-mini")
    assert "total_tokens-1m 0" in flows[0].comment
    assert flows[1].marked == ":no_entry:" and flows[2].marked == ":lock:"
    assert not flows[0].marked


def test_usage_endpoint_answers_from_the_gate(gateway_factory, fresh_mock):
    gateway = gateway_factory(proxy_yaml(count=1000))
    spent = call(gateway, ALICE).json()["usage"]["total_tokens"]
    url = f"{gateway.url}/rate-limited-proxy/tokengate/usage"
    answer = httpx.get(url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-TokenGate-Source"] == "gateway"
    body = answer.json()
    assert (body["proxy"], body["key"], body["scope"]) == ("rate-limited-proxy", "alice", "key")
    [limit] = body["limits"]
    assert limit["name"] == "total_tokens-1m" and limit["limit"] == 1000
    assert (limit["used"], limit["reserved"], limit["remaining"]) == (spent, 0, 1000 - spent)
    assert 0 < limit["reset_in_seconds"] <= 60 and limit["reset"] > 1_700_000_000
    assert answer.headers["X-RateLimit-Remaining"] == str(1000 - spent)
    missing = httpx.get(url, timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    posted = httpx.post(url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    assert posted.status_code == 403
    assert fresh_mock.stats()["requests"] == 1  # only the chat call reached the provider


def test_replay_is_deterministic_and_matches_the_live_decisions(captured, tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    resaved = tmp_path / "resaved.flows"
    replay(captured, first, "-w", str(resaved))
    replay(captured, second)
    assert first.read_bytes() == second.read_bytes()
    replayed = ledger(first)
    assert all(line.pop("replay") is True for line in replayed)
    assert replayed == ledger(captured.ledger)  # same quotas, same decisions, same figures
    # The flows themselves are left as they were (no 401 for a key that was stripped).
    assert [flow.response.status_code for flow in read_flows(resaved)] == CAPTURED
    saved = resaved.read_bytes() + first.read_bytes()
    assert not any(secret in saved for secret in secrets_of(captured))


def test_replay_with_other_quotas_shows_what_they_would_have_done(captured, tmp_path):
    quotas = tmp_path / "quotas.yaml"
    (tmp_path / "provider.key").write_text(captured.provider_key, encoding="utf-8")
    quotas.write_text(
        captured.quotas.read_text().replace("count: 100,", "count: 120,"), encoding="utf-8"
    )
    out = tmp_path / "ledger.jsonl"
    replay(captured, out, quotas=quotas)
    lines = ledger(out)
    assert lines[1]["decision"] == "refused"  # 120 is still less than alice's first call cost
    quotas.write_text(
        captured.quotas.read_text().replace("count: 100,", "count: 1000,"), encoding="utf-8"
    )
    replay(captured, out.with_suffix(".2"), quotas=quotas)
    lines = ledger(out.with_suffix(".2"))
    # The gate had refused alice's second call, so the provider's answer is unknown: status
    # null, the reservation charged as an estimate.
    assert (lines[1]["decision"], lines[1]["status"]) == ("admitted", None)
    assert lines[1]["usage_source"] == "estimated" and lines[1]["total_tokens"] > 0
    assert lines[1]["remaining"]["total_tokens-1m"] < 1000 - lines[0]["total_tokens"]
    # A key that is gone from the quotas is refused now.
    quotas.write_text(
        "\n".join(ln for ln in quotas.read_text().splitlines() if "alice" not in ln),
        encoding="utf-8",
    )
    replay(captured, out.with_suffix(".3"), quotas=quotas)
    lines = ledger(out.with_suffix(".3"))
    assert [line["status"] for line in lines[:2]] == [401, 401]
    assert lines[3]["status"] == 200  # bob is unaffected


def test_client_replay_through_a_live_gate_is_governed(captured, tmp_path, fresh_mock):
    proxies = (
        "  qa:\n    context: /qa\n    provider: mock\n"
        "    token_limits:\n      total_tokens:\n        - {count: 100, duration: 1m}\n"
        "    keys:\n" + key_entries(alice=ALICE)
    )
    quotas = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxies)
    # Besides the capture, a flow the gate did not govern (no note), sent to the mock directly.
    stray = read_flows(captured.flows)[0].copy()
    stray.metadata.clear()
    stray.request.url = f"{fresh_mock.url}/v1/chat/completions"
    for name in ("authorization", "x-api-key"):
        stray.request.headers.pop(name, None)
    flows = tmp_path / "with-stray.flows"
    with flows.open("wb") as handle:
        writer = io.FlowWriter(handle)
        for flow in [*read_flows(captured.flows), stray]:
            writer.add(flow)

    def client_replay(*scripts: str, **env: str) -> list:
        out = tmp_path / "replayed.flows"
        argv = [str(MITMDUMP), "-n", "-C", str(flows)]
        argv += ["--mode", f"reverse:{fresh_mock.url}"]
        for script in (*scripts, "addons/tokengate.py"):
            argv += ["-s", script]
        argv += ["--set", f"tokengate_config={quotas}", "--set", "tokengate_ledger="]
        argv += ["-w", str(out)]
        env = {**os.environ, "TOKENGATE_TEST_PROVIDER_KEY": PROVIDER_KEY, **env}
        subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
        return read_flows(out)

    # Saved flows hold no caller key: replayed as they are, the gate refuses every one.
    refused = client_replay()
    assert [flow.response.status_code for flow in refused[:-1]] == [401] * len(CAPTURED)
    assert fresh_mock.stats()["by_endpoint"] == {"chat/completions": 1}  # the stray only
    fresh_mock.reset()
    # With a key given for the replay, they are admitted and charged like live traffic.
    replayed = client_replay("addons/replay_key.py", TOKENGATE_REPLAY_KEY=ALICE)
    statuses = [flow.response.status_code for flow in replayed]
    assert statuses[:3] == [200, 429, 429]
    assert replayed[1].response.headers["X-TokenGate-Source"] == "gateway"
    assert fresh_mock.stats()["authorized"] >= 1
    # The stray reached the mock without the caller's key: only governed flows are given it.
    assert replayed[-1].response is not None and "authorization" not in replayed[-1].request.headers
    assert f"Bearer {ALICE}" not in fresh_mock.stats()["auth_headers_seen"]
    saved = (tmp_path / "replayed.flows").read_bytes()
    assert PROVIDER_KEY.encode() not in saved and ALICE.encode() not in saved


def test_report_table_json_and_png(captured, tmp_path):
    lines = ledger(captured.ledger)
    report = [sys.executable, str(ROOT / "scripts" / "report.py"), str(captured.ledger)]
    as_json = subprocess.run(
        [*report, "--json"], cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60
    )
    summary = json.loads(as_json.stdout)
    assert summary["lines"] == len(lines)
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert summary["totals"][name] == sum(line[name] for line in lines) > 0
    assert summary["totals"]["refused"] == 1
    rows = {(row["proxy"], row["key"], row["model"]): row for row in summary["rows"]}
    alice = rows[("qa", "alice", "gpt-4o-mini")]
    assert alice["statuses"] == {"200": 1, "429": 1}
    assert alice["refused_by"] == {"total_tokens-1m": 1}
    assert alice["total_tokens"] == lines[0]["total_tokens"]
    png = tmp_path / "tokens.png"
    table = subprocess.run(
        [*report, "--png", str(png)], cwd=tmp_path, check=True, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert "total_tokens-1m:1" in table.stdout
    total_row = table.stdout.splitlines()[-1].split()
    assert total_row[0] == "all" and str(summary["totals"]["total_tokens"]) in total_row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    future = subprocess.run(
        [*report, "--json", "--since", "2999-01-01T00:00:00Z"],
        cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(future.stdout)["lines"] == 0
