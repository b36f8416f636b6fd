"""QA replay of a capture that holds OpenAI, Azure and Anthropic flows (JSON and streamed,
admitted, refused by quota, without a key) gives the ledger the live run wrote, line for line;
and the capture holds neither the provider's key nor a caller's."""

from __future__ import annotations

import subprocess

import httpx

from tests.support.captures import ledger
from tests.support.processes import MITMDUMP, PROVIDER_KEY, ROOT, Gateway, Mock
from tests.support.quotas import ALICE, BOB, key_entries

CAROL = "tg-carol-secret-key"

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
STREAM = {**CHAT, "max_tokens": 5, "stream": True}
DEPLOYMENT = "/openai/deployments/gpt4o-prod"
QUERY = "?api-version=2024-10-21"
MESSAGE = {"model": "claude-sonnet-4-5", "messages": CHAT["messages"], "max_tokens": 5}


PROXIES = (
    ("oa", "openai", "alice", ALICE),
    ("az", "azure", "bob", BOB),
    ("cl", "claude", "carol", CAROL),
)


def quotas_text(mock_url: str) -> str:
    proxies = "".join(
        f"  {name}:\n    context: /{name}\n    provider: {provider}\n"
        "    token_limits:\n      total_tokens:\n        - {count: 100, duration: 1m}\n"
        "    keys:\n" + key_entries(**{key_name: key})
        for name, provider, key_name, key in PROXIES
    )
    return (
        "providers:\n"
        f"  openai:\n    base_url: {mock_url}/v1\n    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n"
        f"  azure:\n    kind: azure\n    base_url: {mock_url}\n    hosts: [azure.test]\n"
        "    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n    deployments: {gpt4o-prod: gpt-4o}\n"
        f"  claude:\n    kind: anthropic\n    base_url: {mock_url}\n    hosts: [claude.test]\n"
        "    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n"
        "proxies:\n" + proxies
    )


# (path, header carrying the key, key, body, status the caller gets), in the order sent.
CALLS = [
    ("/oa/chat/completions", "Authorization", ALICE, STREAM, 200),
    ("/oa/chat/completions", "Authorization", ALICE, CHAT, 200),  # spends the rest, and more
    ("/oa/chat/completions", "Authorization", ALICE, CHAT, 429),
    ("/oa/chat/completions", None, None, CHAT, 401),
    (f"/az{DEPLOYMENT}/chat/completions{QUERY}", "api-key", BOB, STREAM, 200),
    # not named in deployments: recorded as the model its answer names
    (f"/az/openai/deployments/other-dep/chat/completions{QUERY}", "api-key", BOB, STREAM, 200),
    ("/az/openai/v1/responses", "Authorization", BOB, {**CHAT, "model": "gpt4o-prod",
     "input": "Hi", "max_output_tokens": 5, "stream": True}, 200),
    (f"/az{DEPLOYMENT}/chat/completions{QUERY}", "api-key", BOB, CHAT, 200),
    (f"/az{DEPLOYMENT}/chat/completions{QUERY}", "api-key", BOB, CHAT, 429),
    (f"/az{DEPLOYMENT}/embeddings{QUERY}", "api-key", "tg-not-a-key", {"input": "a"}, 401),
    ("/cl/v1/messages", "x-api-key", CAROL, {**MESSAGE, "stream": True}, 200),
    ("/cl/v1/messages", "x-api-key", CAROL, {**MESSAGE, "max_tokens": 500}, 200),  # lowered
    ("/cl/v1/messages", "x-api-key", CAROL, MESSAGE, 429),
    ("/cl/v1/messages", None, None, MESSAGE, 401),
]  # fmt: skip


def test_replay_of_openai_and_azure_flows_gives_the_live_ledger(tmp_path):
    mock = Mock.start("--deployment", "other-dep=gpt-4o-mini-2024-07-18")
    try:
        quotas = tmp_path / "quotas.yaml"
        quotas.write_text(quotas_text(mock.url), encoding="utf-8")
        flows = tmp_path / "capture.flows"
        gateway = Gateway.start(
            quotas,
            f"reverse:{mock.url}",
            "--set", "store_streamed_bodies=true",
            "-w", str(flows),
        )  # fmt: skip
        try:
            with httpx.Client(base_url=gateway.url, timeout=30) as client:
                for path, header, key, body, status in CALLS:
                    headers = {}
                    if header:
                        headers[header] = f"Bearer {key}" if header == "Authorization" else key
                    if path.startswith("/cl/"):
                        headers["anthropic-version"] = "2023-06-01"
                    answer = client.post(path, json=body, headers=headers)
                    assert answer.status_code == status, (path, answer.text)
        finally:
            gateway.stop()
    finally:
        mock.process.stop()

    live = ledger(tmp_path / ".state" / "ledger.jsonl")
    assert len(live) == len(CALLS)
    models = {line["model"] for line in live if line["proxy"] == "az"}
    assert models == {"gpt-4o", "gpt-4o-mini-2024-07-18"}
    saved = flows.read_bytes()
    assert not [secret for secret in (PROVIDER_KEY, ALICE, BOB, CAROL) if secret.encode() in saved]
    assert {line["proxy"] for line in live} == {"oa", "az", "cl", None}

    replayed_path = tmp_path / "replay.jsonl"
    argv = [str(MITMDUMP), "-nr", str(flows), "-s", "addons/tokengate.py"]
    argv += ["--set", f"tokengate_config={quotas}", "--set", f"tokengate_ledger={replayed_path}"]
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=60)
    replayed = ledger(replayed_path)
    assert all(line.pop("replay") is True for line in replayed)
    assert replayed == live
