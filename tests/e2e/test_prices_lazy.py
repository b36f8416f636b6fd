"""A gate with no budget never loads the bundled price table (genai-prices and pydantic, some
15-30 MB): checked inside a real mitmdump after it has governed a request."""

from __future__ import annotations

from tests.support.calls import call
from tests.support.processes import ROOT, Gateway, write_quotas
from tests.support.quotas import ALICE, proxy_yaml

PROBE = str(ROOT / "tests" / "support" / "modules_probe.py")
PRICES = "prices:\n  my-llama-70b: {input: 0.60, output: 0.80}\n"


def test_a_gate_without_a_budget_never_imports_the_price_table(tmp_path, fresh_mock):
    quotas = write_quotas(tmp_path / "quotas.yaml", fresh_mock.url, proxy_yaml(count=100_000))
    quotas.write_text(PRICES + quotas.read_text(), encoding="utf-8")  # prices: parsed, not used
    gateway = Gateway.start(
        quotas,
        f"reverse:{fresh_mock.url}",
        "-s", PROBE,
        "--set", "probe_modules=tokengate_core.prices,genai_prices,pydantic",
    )  # fmt: skip
    try:
        assert call(gateway, ALICE).status_code == 200
        assert call(gateway, ALICE, body={"model": "gpt-4o", "input": "hi"}, path="/embeddings")
    finally:
        gateway.stop()
    probes = [ln for ln in gateway.process.output.splitlines() if "probe:" in ln]
    assert len(probes) == 2, gateway.process.output
    for probe in probes:
        assert probe.endswith(
            "probe: tokengate_core.prices=True genai_prices=False pydantic=False"
        ), probe
