"""Fixtures of the end-to-end tests: the real mock provider, gateways in front of it, a capture."""

from __future__ import annotations

import pytest
from tokengate_core.tools.capture import Capture, capture

from tests.support.captures import CAPTURED
from tests.support.processes import Gateway, Mock, write_quotas
from tests.support.quotas import proxy_yaml


@pytest.fixture(scope="session")
def mock():
    server = Mock.start()
    yield server
    server.process.stop()


@pytest.fixture
def fresh_mock(mock):
    mock.reset()
    return mock


@pytest.fixture
def gateway_factory(tmp_path, fresh_mock):
    started: list[Gateway] = []

    def start(proxies: str | None = None, *args: str, **options) -> Gateway:
        config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxies or proxy_yaml())
        gateway = Gateway.start(config, f"reverse:{fresh_mock.url}", *args, **options)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> Capture:
    made = capture(tmp_path_factory.mktemp("capture"))
    assert made.statuses == CAPTURED
    return made
