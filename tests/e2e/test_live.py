"""End to end: quotas.yaml edited under a running mitmdump, by hand and by scripts/keys.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import openai
import pytest

from tests.support.processes import ROOT, Gateway, wait_until, write_quotas
from tests.support.quotas import ALICE, key_entries

HELLO = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
RELOAD_SECONDS = 10  # the watcher looks once a second; this is only the give-up point


def proxy_yaml(count: int) -> str:
    return (
        "  live:\n"
        "    context: /live\n"
        "    provider: mock\n"
        "    token_limits:\n"
        "      total_tokens:\n"
        f"        - {{count: {count}, duration: 1h}}\n"
        "    keys:\n" + key_entries(alice=ALICE)
    )


@pytest.fixture
def live_gateway(tmp_path, fresh_mock):
    config = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxy_yaml(1000))
    gateway = Gateway.start(config, f"reverse:{fresh_mock.url}")
    yield gateway, config
    gateway.stop()


def call(gateway: Gateway, key: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/live/chat/completions",
        json={**HELLO, "max_tokens": 5},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def outcomes(gateway: Gateway) -> int:
    """How many reloads the gate has logged, taken or refused."""
    return sum(("reloaded (" in line or ") refused," in line) for line in gateway.process.lines)


def edit(gateway: Gateway, change) -> None:
    """Apply `change()` to the quotas file and wait until the gate has dealt with it."""
    before = outcomes(gateway)
    change()
    assert wait_until(lambda: outcomes(gateway) > before, RELOAD_SECONDS), gateway.process.output


def replace_text(config, old: str, new: str) -> None:
    """An editor's save: the new text goes to a temporary file that is renamed over the old."""
    text = config.read_text()
    assert old in text
    temp = config.with_name("quotas.yaml.swp")
    temp.write_text(text.replace(old, new))
    os.replace(temp, config)


def keys_script(config, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "scripts/keys.py", *args, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k != "TOKENGATE_TEST_PROVIDER_KEY"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_a_changed_limit_applies_live_to_the_spent_window(live_gateway):
    gateway, config = live_gateway
    first = call(gateway, ALICE)
    assert first.status_code == 200, first.text
    spent = int(first.headers["X-Tokens-Consumed"])
    assert first.headers["X-RateLimit-Limit"] == "1000"

    edit(gateway, lambda: replace_text(config, "count: 1000", f"count: {spent}"))
    client = openai.OpenAI(base_url=f"{gateway.url}/live", api_key=ALICE, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**HELLO, max_tokens=5)
    assert refused.value.response.headers["X-RateLimit-Quota"] == "total_tokens-1h"
    assert f"limit {spent}, used {spent}" in refused.value.message

    edit(gateway, lambda: replace_text(config, f"count: {spent}", "count: 5000"))
    again = call(gateway, ALICE)
    assert again.status_code == 200, again.text
    # The window kept what was spent before both reloads.
    charged = spent + int(again.headers["X-Tokens-Consumed"])
    assert again.headers["X-RateLimit-Remaining"] == str(5000 - charged)
    assert "tokengate: " in gateway.process.output and "5000 total_tokens-1h" in (
        gateway.process.output
    )


def test_an_invalid_edit_is_logged_with_its_line_and_the_old_config_keeps_serving(live_gateway):
    gateway, config = live_gateway
    edit(gateway, lambda: replace_text(config, "duration: 1h", "duration: 1w"))
    assert f"{config}:12: bad duration '1w'" in gateway.process.output
    assert "the last good configuration keeps serving" in gateway.process.output
    still = call(gateway, ALICE)
    assert still.status_code == 200, still.text
    assert still.headers["X-RateLimit-Limit"] == "1000"
    assert gateway.process.popen.poll() is None  # and mitmdump is still running


def test_keys_created_rotated_expired_and_revoked_take_effect_live(live_gateway):
    gateway, config = live_gateway
    app: list[str] = []
    edit(gateway, lambda: app.append(keys_script(config, "create", "live", "app")))
    assert call(gateway, app[0]).status_code == 200

    new: list[str] = []
    edit(gateway, lambda: new.append(keys_script(config, "rotate", "live", "app", "--grace", "1h")))
    assert call(gateway, new[0]).status_code == 200
    assert call(gateway, app[0]).status_code == 200  # the old one, within its grace period

    old_name = re.search(r"(app\.rotated-[\w-]+):", config.read_text()).group(1)
    edit(gateway, lambda: keys_script(config, "expire", "live", old_name, "now"))
    expired = call(gateway, app[0])
    assert expired.status_code == 401
    assert "expired at" in expired.json()["error"]["message"]
    assert call(gateway, new[0]).status_code == 200

    edit(gateway, lambda: keys_script(config, "revoke", "live", "app"))
    revoked = call(gateway, new[0])
    assert revoked.status_code == 401
    assert revoked.json()["error"]["message"] == "Incorrect API key provided."
    assert call(gateway, ALICE).status_code == 200
    output = gateway.process.output
    assert app[0] not in output and new[0] not in output  # secrets never reach the log
