"""OpenAI's Codex CLI behind the gate, as docs/providers.md shows it: installed with npm (into
the folder the tests keep between runs; skipped without npm), `codex exec` streams the Responses
API through a real mitmdump to the mock, in front of OpenAI and of Azure, and the gate charges
what the mock billed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from tokengate_core.keys import hash_key

from tests.support.captures import ledger
from tests.support.docblocks import (
    ROOT,
    blocks_for,
    commands,
    reader_env,
    run_block,
    tool_folder,
    with_ports,
)
from tests.support.npm import npm_environment, with_npm
from tests.support.processes import PROVIDER_KEY, Gateway, Mock, wait_until

HERE = Path(__file__).resolve().relative_to(ROOT).as_posix()
KEYS = {"team": "tg-codex-team-key-0123456789", "azure": "tg-codex-azure-key-0123456789"}


@pytest.fixture(scope="module")
def npm_env() -> dict[str, str]:
    return npm_environment("Codex CLI")


def quotas_text(mock_url: str) -> str:
    proxies = "".join(
        f"  {name}:\n    context: /{name}\n    provider: {provider}\n"
        "    token_limits:\n      total_tokens:\n        - {count: 100000, duration: 1m}\n"
        f'    keys:\n      codex: {{sha256: "{hash_key(KEYS[name])}"}}\n'
        for name, provider in (("team", "openai"), ("azure", "azure"))
    )
    return (
        "providers:\n"
        f"  openai:\n    base_url: {mock_url}/v1\n    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n"
        f"  azure:\n    kind: azure\n    base_url: {mock_url}\n    hosts: [azure.test]\n"
        "    api_key_env: TOKENGATE_TEST_PROVIDER_KEY\n    deployments: {gpt4o-prod: gpt-4o}\n"
        "proxies:\n" + proxies
    )


def tokens_used(output: str) -> int:
    """The figure Codex prints after `tokens used`."""
    found = re.search(r"tokens used\s+([\d,]+)", output)
    assert found, output
    return int(found[1].replace(",", ""))


def test_codex_exec_through_the_gate(npm_env, tmp_path):
    install, openai_block, azure_block = blocks_for(f"{HERE}::test_codex_exec_through_the_gate")
    folder, home = tmp_path / "work", tmp_path / "home"
    folder.mkdir()
    home.mkdir()
    env = with_npm(reader_env(tool_folder(tmp_path / "bin"), home), npm_env)
    if shutil.which("codex", path=npm_env["PATH"]) is None:  # installed once, then kept
        installed = run_block(install.text, folder, env, timeout=600)
        assert installed.returncode == 0, installed
    mock = Mock.start()
    try:
        quotas = tmp_path / "quotas.yaml"
        quotas.write_text(quotas_text(mock.url), encoding="utf-8")
        gateway = Gateway.start(quotas, f"reverse:{mock.url}")
        ports = {8080: gateway.port}
        try:
            ran = []
            for proxy, script in (
                ("team", with_ports(openai_block.text, ports)),
                ("azure", with_ports(azure_config(azure_block.text, openai_block), ports)),
            ):
                mock.reset()
                run = run_block(script, folder, {**env, "TOKENGATE_KEY": KEYS[proxy]}, 120)
                output = run.stdout + run.stderr
                assert run.returncode == 0, output
                assert "Lorem ipsum" in run.stdout  # the mock's answer, streamed to Codex
                stats = mock.stats()
                assert stats["by_endpoint"] == {"responses": 1} and stats["unauthorized"] == 0
                assert KEYS[proxy] not in str(stats["last_request"]["headers"])
                ran.append((proxy, tokens_used(output), stats))
            path = tmp_path / ".state" / "ledger.jsonl"
            assert wait_until(lambda: path.exists() and len(ledger(path)) == 2)
        finally:
            gateway.stop()
    finally:
        mock.process.stop()
    lines = ledger(path)
    for (proxy, used, stats), line in zip(ran, lines, strict=True):
        assert (line["proxy"], line["endpoint"], line["stream"]) == (proxy, "responses", True)
        assert line["usage_source"] == "reported"
        assert line["total_tokens"] == stats["tokens_served"]["total"] == used  # books exact
    assert [line["model"] for line in lines] == ["gpt-4o-mini", "gpt-4o"]
    team, azure = (stats["last_request"] for _, _, stats in ran)
    assert team["path"] == "/v1/responses"
    assert team["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert azure["path"] == "/openai/responses"
    assert azure["headers"]["api-key"] == PROVIDER_KEY and "authorization" not in azure["headers"]


def azure_config(toml: str, openai_block) -> str:
    """The Azure provider table as config.toml, then the same `codex exec` as for OpenAI."""
    run = commands(openai_block)[-1].text
    return f"cat > ~/.codex/config.toml <<'EOF'\n{toml}EOF\n{run}\n"
