"""Real processes for end-to-end tests: the mock provider and mitmdump with TokenGate loaded."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tokengate_core.tools.children import MOCK, Child

ROOT = Path(__file__).resolve().parents[2]
MITMDUMP = Path(sys.executable).with_name("mitmdump")
PROVIDER_KEY = "sk-provider-secret-0123456789"
STARTUP_SECONDS = 30
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")  # where a caller's key can be


def credentials_in(headers) -> list[str]:
    """The credential headers present in `headers` (any mapping of names), compared
    case-insensitively as HTTP does: the names of mitmproxy's headers and of the mock's report
    (a plain dict) stay as they were sent (`X-API-Key`), where a lower-case key finds nothing."""
    names = {name.lower() for name in headers}
    return [name for name in CREDENTIAL_HEADERS if name in names]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


@dataclass
class Mock:
    process: Child
    url: str  # http(s)://127.0.0.1:PORT

    @classmethod
    def start(cls, *args: str, key: str | None = PROVIDER_KEY) -> Mock:
        """The mock provider, requiring `key` (None: any, or none, as a keyless server)."""
        argv = [*MOCK, *(("--expect-key", key) if key else ()), *args]
        process = Child(argv, _env(), ready=re.compile(r"listening at (\S+)"), cwd=ROOT)
        match = process.wait_ready(STARTUP_SECONDS)
        if match is None:
            process.stop()
            raise RuntimeError(f"mock did not start:\n{process.output}")
        return cls(process, match.group(1))

    def _call(self, method: str, path: str) -> dict:
        request = urllib.request.Request(self.url + path, method=method)
        with urllib.request.urlopen(request, timeout=10, context=_insecure()) as response:
            return json.loads(response.read() or b"{}")

    def stats(self) -> dict:
        return self._call("GET", "/mock/stats")

    def reset(self) -> None:
        self._call("POST", "/mock/reset")

    def last_request_headers(self) -> httpx.Headers:
        """The headers of the last request the mock received. The mock reports names as they were
        sent (`X-API-Key`); these compare them case-insensitively, as HTTP does."""
        last = self.stats()["last_request"]
        return httpx.Headers(last["headers"] if last else {})


def _insecure():
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class Gateway:
    process: Child
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        config: Path,
        mode: str,
        *args: str,
        env: dict[str, str] | None = None,
        expect_failure: bool = False,
        flow_detail: int = 0,
    ) -> Gateway:
        argv = [
            str(MITMDUMP),
            "--listen-host", "127.0.0.1",
            "-p", "0",
            "--mode", mode,
            "--set", f"flow_detail={flow_detail}",
            "--set", f"tokengate_config={config}",
            "-s", str(ROOT / "addons" / "tokengate.py"),
            *args,
        ]  # fmt: skip
        env = _env(TOKENGATE_TEST_PROVIDER_KEY=PROVIDER_KEY, **(env or {}))
        process = Child(argv, env, cwd=ROOT)
        match = process.wait_ready(STARTUP_SECONDS)
        if expect_failure:
            process.popen.wait(STARTUP_SECONDS)
            return cls(process, 0)
        if match is None:
            process.stop()
            raise RuntimeError(f"mitmdump did not start:\n{process.output}")
        return cls(process, int(match.group(1)))

    def stop(self) -> int:
        return self.process.stop()


def write_quotas(path: Path, mock_url: str, proxies: str, provider_extra: str = "") -> Path:
    """A quotas file whose provider is the mock; `proxies` is the YAML body under `proxies:`."""
    host = re.sub(r"^https?://([^:/]+).*$", r"\1", mock_url)
    path.write_text(
        "providers:\n"
        "  mock:\n"
        f"    base_url: {mock_url}/v1\n"
        "    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n"
        f"    hosts: [{host}]\n"
        f"{provider_extra}"
        "proxies:\n" + proxies,
        encoding="utf-8",
    )
    return path


def wait_until(predicate, timeout: float = 5.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


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


def run_benchmark(module: str, *args: str, timeout: float) -> dict:
    """Run `python -m scripts.bench.<module> ARGS --json` as users do; its report, parsed."""
    run = subprocess.run(
        [sys.executable, "-m", f"scripts.bench.{module}", *args, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)
