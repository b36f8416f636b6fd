"""Azure OpenAI and keyless servers end to end: real mitmdump, the real mock, the official
`openai` SDK's `AzureOpenAI` unmodified, in reverse and in regular mode.

One gateway in reverse mode serves the module: its proxies `az` (Azure, roomy), `walk` (Azure,
100 tokens a minute) and `llm` (a keyless OpenAI-compatible server: a second mock that requires
no key). The mock answers deployment `gpt4o-prod` as model `gpt-4o-2024-08-06`; quotas.yaml says
it serves `gpt-4o`, the model the gate limits and records. Deployment `other-dep`, which
quotas.yaml does not name, is recorded as the model its answers name.
"""

from __future__ import annotations

import openai
import pytest

from tests.support.captures import ledger
from tests.support.processes import PROVIDER_KEY, Gateway, Mock, self_signed, wait_until
from tests.support.quotas import ALICE, BOB, key_entries

CAROL = "tg-carol-secret-key"
API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt4o-prod"
SERVED_AS = "gpt-4o-2024-08-06"  # the model the mock's deployment answers with
OTHER, OTHER_SERVED_AS = "other-dep", "gpt-4o-mini-2024-07-18"  # a deployment quotas.yaml omits
HELLO = [{"role": "user", "content": "Hello!"}]


def providers(azure_url: str, local_url: str, hosts: str = "    hosts: [azure.test]\n") -> str:
    """The Azure provider (reverse mode: on a host of its own, since the keyless server's mock
    shares 127.0.0.1 and a host speaks one API) and the keyless one."""
    return (
        "providers:\n"
        "  azure:\n"
        "    kind: azure\n"
        f"    base_url: {azure_url}\n"
        "    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n"
        f"{hosts}"
        f"    deployments: {{{DEPLOYMENT}: gpt-4o}}\n"
        "  local:\n"
        f"    base_url: {local_url}/v1\n"  # no key: keyless
    )


def proxy(name: str, provider: str, count: int, **keys: str) -> str:
    return (
        f"  {name}:\n    context: /{name}\n    provider: {provider}\n"
        f"    token_limits:\n      total_tokens:\n        - {{count: {count}, duration: 1m}}\n"
        "    keys:\n" + key_entries(**keys)
    )


def azure(base: str, key: str = ALICE, **options) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=base, api_key=key, api_version=API_VERSION, max_retries=0, **options
    )


@pytest.fixture(scope="module")
def mocks():
    azure_mock = Mock.start(
        "--deployment", f"{DEPLOYMENT}={SERVED_AS}", "--deployment", f"{OTHER}={OTHER_SERVED_AS}"
    )  # fmt: skip
    local_mock = Mock.start(key=None)
    yield azure_mock, local_mock
    azure_mock.process.stop()
    local_mock.process.stop()


@pytest.fixture(scope="module")
def reverse(tmp_path_factory, mocks):
    azure_mock, local_mock = mocks
    folder = tmp_path_factory.mktemp("azure")
    quotas = folder / "quotas.yaml"
    quotas.write_text(
        providers(azure_mock.url, local_mock.url)
        + "proxies:\n"
        + proxy("az", "azure", 100_000, alice=ALICE)
        + proxy("walk", "azure", 100, bob=BOB)
        + proxy("llm", "local", 100_000, carol=CAROL),
        encoding="utf-8",
    )
    gateway = Gateway.start(quotas, f"reverse:{azure_mock.url}")
    yield gateway, folder / ".state" / "ledger.jsonl"
    gateway.stop()


def ledger_of(path, proxy_name: str) -> list[dict]:
    return [line for line in ledger(path) if line["proxy"] == proxy_name]


def test_azure_openai_sdk_unmodified_books_exact(reverse, mocks):
    gateway, ledger_path = reverse
    azure_mock, _ = mocks
    azure_mock.reset()
    client = azure(f"{gateway.url}/az")
    raw = client.chat.completions.with_raw_response.create(
        model=DEPLOYMENT, messages=HELLO, max_tokens=30
    )
    completion = raw.parse()
    assert completion.model == SERVED_AS and completion.usage.completion_tokens == 30
    assert raw.headers["X-Tokens-Consumed"] == str(completion.usage.total_tokens)
    # Streamed: the gate asks for usage and takes that chunk out again; the SDK sees none.
    chunks = list(
        client.chat.completions.create(model=DEPLOYMENT, messages=HELLO, max_tokens=9, stream=True)
    )
    assert chunks and all(chunk.usage is None for chunk in chunks)
    embedding = client.embeddings.create(model=DEPLOYMENT, input=["a", "b"])
    assert embedding.usage.prompt_tokens > 0
    other = list(client.chat.completions.create(model=OTHER, messages=HELLO, stream=True))
    assert other[0].model == OTHER_SERVED_AS
    # The v1 API, with the plain OpenAI client (Bearer), the deployment in the body; streamed
    # Responses API as Codex CLI uses it.
    v1 = openai.OpenAI(base_url=f"{gateway.url}/az/openai/v1", api_key=ALICE, max_retries=0)
    with v1.responses.stream(model=DEPLOYMENT, input="Hi", max_output_tokens=12) as events:
        response = events.get_final_response()
    assert response.usage.output_tokens == 12

    # Books exact: the ledger holds what the provider billed, recorded on the configured model.
    assert wait_until(lambda: len(ledger_of(ledger_path, "az")) == 5)
    lines = ledger_of(ledger_path, "az")
    served = azure_mock.stats()["tokens_served"]["total"]
    assert sum(line["total_tokens"] for line in lines) == served
    # The model quotas.yaml names for the deployment, else the one its answer names.
    assert [line["model"] for line in lines] == ["gpt-4o"] * 3 + [OTHER_SERVED_AS, "gpt-4o"]
    assert {line["usage_source"] for line in lines} == {"reported"}
    text = ledger_path.read_text(encoding="utf-8")
    assert not [secret for secret in (ALICE, BOB, CAROL, PROVIDER_KEY) if secret in text]
    # Upstream, the provider's key in api-key, never a caller's key, never in Authorization.
    stats = azure_mock.stats()
    assert stats["requests"] == 5 and stats["unauthorized"] == 0
    assert stats["auth_headers_seen"] == []
    assert azure_mock.last_request_headers()["api-key"] == PROVIDER_KEY


def test_walkthrough_200_429_401(reverse, mocks):
    gateway, _ = reverse
    azure_mock, _ = mocks
    azure_mock.reset()
    client = azure(f"{gateway.url}/walk", BOB)
    first = client.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=HELLO)
    assert first.http_response.status_code == 200
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=DEPLOYMENT, messages=HELLO)
    assert refused.value.response.headers["X-TokenGate-Source"] == "gateway"
    assert "Rate limit reached for proxy 'walk'" in refused.value.message
    with pytest.raises(openai.AuthenticationError) as unknown:
        azure(f"{gateway.url}/walk", "tg-not-a-key").chat.completions.create(
            model=DEPLOYMENT, messages=HELLO
        )
    assert unknown.value.body["code"] == "invalid_api_key"
    assert azure_mock.stats()["requests"] == 1  # only the admitted call reached the provider


def test_a_keyless_server_gets_no_credential(reverse, mocks):
    gateway, ledger_path = reverse
    _, local_mock = mocks
    local_mock.reset()
    client = openai.OpenAI(base_url=f"{gateway.url}/llm", api_key=CAROL, max_retries=0)
    completion = client.chat.completions.create(model="llama3", messages=HELLO, max_tokens=5)
    assert completion.usage.completion_tokens == 5
    with pytest.raises(openai.AuthenticationError):  # still the gate's key that admits
        openai.OpenAI(
            base_url=f"{gateway.url}/llm", api_key="tg-wrong", max_retries=0
        ).models.list()
    stats = local_mock.stats()
    assert stats["requests"] == 1
    assert stats["auth_headers_seen"] == []  # no Authorization at all
    assert set(stats["other_headers_seen"].values()) == {0}  # nor api-key, x-api-key
    assert wait_until(lambda: ledger_of(ledger_path, "llm"))
    assert ledger_of(ledger_path, "llm")[0]["total_tokens"] == completion.usage.total_tokens


def test_regular_mode_by_host(tmp_path, mocks, monkeypatch):
    """`AzureOpenAI` keeps the resource's own URL; HTTPS_PROXY sends it through the gate."""
    _, local_mock = mocks
    pem = self_signed(tmp_path)
    tls_mock = Mock.start("--tls-cert", str(pem), "--deployment", f"{DEPLOYMENT}={SERVED_AS}")
    try:
        url = tls_mock.url.replace("127.0.0.1", "localhost")
        quotas = tmp_path / "quotas.yaml"
        quotas.write_text(
            providers(url, local_mock.url, "    hosts: [localhost]\n")
            + "proxies:\n"
            + proxy("walk", "azure", 100, bob=BOB),
            encoding="utf-8",
        )
        confdir = tmp_path / "confdir"
        gateway = Gateway.start(
            quotas,
            "regular",
            "--set", f"confdir={confdir}",
            "--set", f"ssl_verify_upstream_trusted_ca={pem}",
        )  # fmt: skip
        try:
            for variable in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
                monkeypatch.delenv(variable, raising=False)
            monkeypatch.setenv("HTTPS_PROXY", gateway.url)
            monkeypatch.setenv("SSL_CERT_FILE", str(confdir / "mitmproxy-ca-cert.pem"))
            client = azure(url, BOB)
            first = client.chat.completions.create(model=DEPLOYMENT, messages=HELLO)
            assert first.model == SERVED_AS
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=DEPLOYMENT, messages=HELLO)
            with pytest.raises(openai.AuthenticationError):
                azure(url, "tg-not-a-key").chat.completions.create(model=DEPLOYMENT, messages=HELLO)
            stats = tls_mock.stats()
            assert stats["requests"] == 1 and stats["auth_headers_seen"] == []
            assert tls_mock.last_request_headers()["api-key"] == PROVIDER_KEY
            path = stats["last_request"]["path"]
            assert path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
        finally:
            gateway.stop()
    finally:
        tls_mock.process.stop()
