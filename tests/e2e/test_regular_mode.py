"""Regular-proxy mode: an app uses HTTPS_PROXY and trusts mitmproxy's CA; only provider hosts
are governed."""

from __future__ import annotations

import ssl

import httpx
import openai
import pytest

from tests.support.processes import PROVIDER_KEY, Gateway, Mock, self_signed, write_quotas
from tests.support.quotas import ALICE, key_entries


@pytest.fixture
def tls_setup(tmp_path):
    pem = self_signed(tmp_path)
    mock = Mock.start("--tls-cert", str(pem))
    url = mock.url.replace("127.0.0.1", "localhost")
    proxies = (
        "  apps:\n    context: /apps\n    provider: mock\n"
        "    token_limits:\n      total_tokens:\n        - {count: 100, duration: 1m}\n"
        "    keys:\n" + key_entries(alice=ALICE)
    )
    config = write_quotas(tmp_path / "quotas.yaml", url, proxies)
    confdir = tmp_path / "confdir"
    gateway = Gateway.start(
        config,
        "regular",
        "--set", f"confdir={confdir}",
        "--set", f"ssl_verify_upstream_trusted_ca={pem}",
    )  # fmt: skip
    yield url, mock, gateway, confdir / "mitmproxy-ca-cert.pem"
    gateway.stop()
    mock.process.stop()


def test_https_proxy_app_is_governed(tls_setup, monkeypatch):
    url, mock, gateway, ca = tls_setup
    for variable in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", gateway.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    # The app talks to the provider's own URL; only the proxy settings point it at the gate.
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=ALICE, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}]
    )
    assert raw.http_response.status_code == 200
    assert "x-ratelimit-remaining-tokens" in raw.headers
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}]
        )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    stats = mock.stats()
    assert stats["requests"] == 1
    assert stats["auth_headers_seen"] == [f"Bearer {PROVIDER_KEY}"]

    # Traffic to hosts that are not providers passes untouched (here: the mock's stats page by IP).
    with httpx.Client(proxy=gateway.url, verify=ssl.create_default_context(cafile=ca)) as plain:
        passed = plain.get(f"{url.replace('localhost', '127.0.0.1')}/mock/stats")
    assert passed.status_code == 200
    assert "X-RateLimit-Remaining" not in passed.headers
