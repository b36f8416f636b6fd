"""Regular-proxy mode: an app uses HTTPS_PROXY and trusts mitmproxy's CA; only provider hosts
are governed."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import ALICE, key_entries
from tests.e2e import PROVIDER_KEY, Gateway, Mock, write_quotas


def self_signed(folder: Path) -> Path:
    """A certificate for localhost, so the mock provider can speak HTTPS like a real one."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = folder / "mock.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem


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
