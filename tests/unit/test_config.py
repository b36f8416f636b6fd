"""quotas.yaml loading: a valid file gives the expected objects; every mistake names its line."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
from tokengate_core.config import (
    DEFAULT_COMPLETION_RESERVE,
    Limit,
    StoreSpec,
    load_config,
    parse_duration,
)
from tokengate_core.keys import hash_key
from tokengate_core.yamlsource import ConfigError

REPO_QUOTAS = Path(__file__).resolve().parents[2] / "quotas.yaml"
DEMO_KEY = "tg-demo-key-for-the-bundled-mock-only"
DEMO_HASH = "fa8371038d59983d6901e75749f4ca53f1a18b6c03d8c0447afd8ef22ce5b41a"
OTHER_KEY = "tg-other-caller"
OTHER_HASH = hash_key(OTHER_KEY)
ENV = "TG_TEST_MOCK_KEY"

VALID = f"""\
# TokenGate quotas used by the tests.
providers:
  mock-openai:
    base_url: http://127.0.0.1:4010/v1/
    api_key_env: {ENV}
    hosts: [127.0.0.1, LocalHost]
  filed:
    base_url: https://api.example.com/v1
    api_key_file: secrets/provider.key

proxies:
  rate-limited-proxy:
    version: v1.0
    context: /rate-limited-proxy/
    provider: mock-openai
    scope: key
    token_limits:
      total_tokens:
        - {{count: 100, duration: 1m}}
        - {{count: 5000, duration: 1d}}
      prompt_tokens:
        - count: 50
          duration: 30s
    request_limits:
      - {{count: 10, duration: 90s}}
    completion_reserve: 64
    keys:
      test-key: {{sha256: "{DEMO_HASH}"}}
  shared:
    context: /shared
    provider: filed
    scope: proxy
    keys:
      other: {{sha256: "{OTHER_HASH}"}}
"""

MARK = "# HERE"


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the provider key file and the env variable set; returns the folder."""
    monkeypatch.setenv(ENV, "  sk-from-env  \n")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "provider.key").write_text("sk-from-file\n", encoding="utf-8")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "quotas.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def marked_line(text: str) -> int:
    lines = [n for n, line in enumerate(text.splitlines(), 1) if MARK in line]
    assert len(lines) == 1, f"test text needs exactly one {MARK!r} marker"
    return lines[0]


def replaced(old: str, new: str) -> str:
    assert VALID.count(old) == 1, f"{old!r} must occur once in VALID"
    return VALID.replace(old, new)


def expect_error(path: Path, line: int, reason: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    assert error.line == line, f"line {error.line}, expected {line}: {error}"
    assert reason in error.reason, error.reason
    assert str(error).startswith(f"{path}:{line}:"), str(error)
    return error


# --- a valid file -------------------------------------------------------------------------------


def test_valid_file_loads_providers(setup: Path) -> None:
    config = load_config(write(setup, VALID))
    assert config.path == setup / "quotas.yaml"
    assert set(config.providers) == {"mock-openai", "filed"}

    mock = config.providers["mock-openai"]
    assert mock.base_url == "http://127.0.0.1:4010/v1"  # trailing slash dropped
    assert mock.base_path == "/v1"
    assert mock.api_key == "sk-from-env"  # whitespace around the env value stripped
    assert mock.hosts == ("127.0.0.1", "localhost")  # lower-cased

    filed = config.providers["filed"]
    assert filed.api_key == "sk-from-file"
    assert filed.hosts == ("api.example.com",)  # defaults to the base_url host
    assert "sk-from" not in repr(mock) + repr(filed)  # keys are not in reprs (logs)


def test_valid_file_loads_proxies_limits_scope_keys(setup: Path) -> None:
    config = load_config(write(setup, VALID))
    assert list(config.proxies) == ["rate-limited-proxy", "shared"]

    proxy = config.proxies["rate-limited-proxy"]
    assert proxy.version == "v1.0"
    assert proxy.context == "/rate-limited-proxy"
    assert proxy.provider is config.providers["mock-openai"]
    assert proxy.scope == "key"
    assert proxy.completion_reserve == 64
    assert proxy.limits == (
        Limit("total_tokens", 100, 60, "1m", rank=0),
        Limit("total_tokens", 5000, 86400, "1d", rank=1),
        Limit("prompt_tokens", 50, 30, "30s", rank=0),
        Limit("requests", 10, 90, "90s", rank=0),
    )
    assert proxy.limits[0].name == "total_tokens-1m"
    assert len(proxy.keys) == 1
    found = proxy.keys.find(DEMO_KEY)
    assert found is not None and found.name == "test-key"
    assert proxy.keys.find(OTHER_KEY) is None

    shared = config.proxies["shared"]
    assert shared.version is None
    assert shared.scope == "proxy"
    assert shared.provider is config.providers["filed"]
    assert shared.limits == ()
    assert shared.completion_reserve == DEFAULT_COMPLETION_RESERVE
    other = shared.keys.find(OTHER_KEY)
    assert other is not None and other.name == "other"

    summary = config.summary()
    assert "rate-limited-proxy (/rate-limited-proxy -> mock-openai, scope key" in summary
    assert "100 total_tokens-1m" in summary


BUDGETED = replaced(
    "    scope: key\n",
    """    scope: key
    models: [gpt-4o*, o4-mini]
    strict: true
    budgets:
      - {usd: 5, duration: 1d}
      - {usd: 200.5, duration: 30d, scope: proxy, models: [o4-*]}
    weights: {cached_prompt_tokens: 0.1}
""",
).replace(
    "        - {count: 5000, duration: 1d}\n",
    "        - {count: 5000, duration: 1d}\n"
    "        - {count: 20, duration: 1m, models: [gpt-4o*]}\n"
    "        - {count: 900, duration: 1m, scope: proxy}\n",
)


def test_models_scopes_budgets_and_weights_load(setup: Path) -> None:
    config = load_config(write(setup, BUDGETED))
    proxy = config.proxies["rate-limited-proxy"]
    assert (proxy.models, proxy.strict, proxy.budgeted) == (("gpt-4o*", "o4-mini"), True, True)
    assert proxy.allows("gpt-4o-mini") and proxy.allows("o4-mini") and not proxy.allows("o3")
    by_name = {limit.name: limit for limit in proxy.limits}
    # Ranked by duration, then place in the file: the window a limit keeps across edits.
    assert {name: limit.window for name, limit in by_name.items()} == {
        "total_tokens-1m": "total_tokens#0",
        "total_tokens-1m[gpt-4o*]": "total_tokens#1",
        "total_tokens-1m@proxy": "total_tokens#2",
        "total_tokens-1d": "total_tokens#3",
        "prompt_tokens-30s": "prompt_tokens#0",
        "requests-90s": "requests#0",
        "usd-1d": "usd#0",
        "usd-30d[o4-*]@proxy": "usd#1",
    }
    assert by_name["usd-1d"].count == 5_000_000  # micro-dollars, exactly
    assert by_name["usd-30d[o4-*]@proxy"].count == 200_500_000
    assert by_name["total_tokens-1m"].cached_weight == Fraction(1, 10)
    assert by_name["requests-90s"].cached_weight == 1  # weights are for token limits
    assert "$5.000000 usd-1d" in config.summary()


def test_editing_a_limits_models_keeps_its_window(setup: Path) -> None:
    before = load_config(write(setup, BUDGETED)).proxies["rate-limited-proxy"]
    edited = BUDGETED.replace("models: [gpt-4o*]}", "models: [gpt-4o*, gpt-4.1*]}")
    after = load_config(write(setup, edited)).proxies["rate-limited-proxy"]
    assert [limit.window for limit in before.limits] == [limit.window for limit in after.limits]


def test_queue_wait_is_off_unless_set(setup: Path) -> None:
    assert load_config(write(setup, VALID)).proxies["rate-limited-proxy"].queue_wait == 0
    queued = replaced("    scope: key\n", "    scope: key\n    queue_wait: 2s\n")
    assert load_config(write(setup, queued)).proxies["rate-limited-proxy"].queue_wait == 2


def test_scope_defaults_to_key(setup: Path) -> None:
    config = load_config(write(setup, replaced("    scope: key\n", "")))
    assert config.proxies["rate-limited-proxy"].scope == "key"


def test_key_file_is_resolved_against_the_quotas_folder(
    setup: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(setup, VALID)
    elsewhere = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(elsewhere)  # a cwd-relative lookup would not find secrets/provider.key
    assert load_config(path).providers["filed"].api_key == "sk-from-file"


def test_absolute_key_file(setup: Path) -> None:
    absolute = setup / "secrets" / "provider.key"
    config = load_config(
        write(setup, replaced("api_key_file: secrets/provider.key", f"api_key_file: {absolute}"))
    )
    assert config.providers["filed"].api_key == "sk-from-file"


def test_repository_quotas_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENGATE_MOCK_PROVIDER_KEY", "sk-mock")
    config = load_config(REPO_QUOTAS)
    proxy = config.proxies["rate-limited-proxy"]
    assert proxy.provider.base_url == "http://127.0.0.1:4010/v1"
    assert proxy.provider.hosts == ("127.0.0.1",)
    assert proxy.limits == (Limit("total_tokens", 100, 60, "1m", rank=0),)
    assert proxy.keys.find(DEMO_KEY) is not None


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("1m", 60), ("1h", 3600), ("1d", 86400), ("90s", 90), ("15m", 900)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["1w", "0m", "-1m", "10", 10, "1.5m", "", "m", "1 m", "01m", None, True, 1.5]
)
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


# --- broken files: each names the exact line --------------------------------------------------

LIMIT_ITEM = "{count: 100, duration: 1m}"
BROKEN = {
    "unknown top-level field": (
        VALID + "extras: 1  # HERE\n",
        "unknown field 'extras'",
    ),
    "unknown provider field": (
        replaced(f"    api_key_env: {ENV}\n", f"    api_key_env: {ENV}\n    timeout: 5  # HERE\n"),
        "unknown field 'timeout'",
    ),
    "unknown proxy field": (
        replaced("    scope: key\n", "    scope: key\n    colour: red  # HERE\n"),
        "unknown field 'colour'",
    ),
    "unknown limit item field": (
        replaced(LIMIT_ITEM, "{count: 100, duration: 1m, burst: 2}  # HERE"),
        "unknown field 'burst'",
    ),
    "unknown limit item field (block style)": (
        replaced(
            "          duration: 30s\n", "          duration: 30s\n          per: ip  # HERE\n"
        ),
        "unknown field 'per'",
    ),
    "negative count": (
        replaced(LIMIT_ITEM, "{count: -5, duration: 1m}  # HERE"),
        "count must be a whole number >= 1",
    ),
    "zero count": (
        replaced(LIMIT_ITEM, "{count: 0, duration: 1m}  # HERE"),
        "count must be a whole number >= 1",
    ),
    "bool count": (
        replaced(LIMIT_ITEM, "{count: true, duration: 1m}  # HERE"),
        "count must be a whole number >= 1",
    ),
    "float count (block style)": (
        replaced("        - count: 50\n", "        - count: 2.5  # HERE\n"),
        "count must be a whole number >= 1",
    ),
    "two limits of one dimension and duration": (
        replaced(
            "        - {count: 5000, duration: 1d}\n",
            "        - {count: 5000, duration: 1d}\n        - {count: 50, duration: 60s}  # HERE\n",
        ),
        "a second total_tokens limit per 60s",
    ),
    "redis url that does not parse": (
        VALID + "store: {kind: redis, url: 'redis://:pa#ss@127.0.0.1:6379/0'}  # HERE\n",
        "the redis URL does not parse",
    ),
    "unknown fail mode": (
        replaced("    scope: key\n", "    scope: key\n    fail: sometimes  # HERE\n"),
        "fail must be one of closed, open",
    ),
    "unknown store kind": (
        VALID + "store: {kind: postgres}  # HERE\n",
        "kind must be one of sqlite, memory, redis",
    ),
    "store without kind": (
        VALID + "store: {path: x.db}  # HERE\n",
        "store needs 'kind'",
    ),
    "redis store without url": (
        VALID + "store: {kind: redis}  # HERE\n",
        "needs exactly one of url, url_env",
    ),
    "redis store with a non-redis url": (
        VALID + "store: {kind: redis, url: 'http://127.0.0.1:6379'}  # HERE\n",
        "must start with redis://",
    ),
    "path on a redis store": (
        VALID + "store:\n  kind: redis\n  url: redis://127.0.0.1\n  path: x.db  # HERE\n",
        "path does not apply to redis",
    ),
    "cluster not a boolean": (
        VALID + "store: {kind: redis, url: 'redis://h:7000', cluster: yes please}  # HERE\n",
        "cluster must be true or false",
    ),
    "cluster on a sqlite store": (
        VALID + "store:\n  kind: sqlite\n  cluster: true  # HERE\n",
        "cluster does not apply to sqlite",
    ),
    "cluster_nodes without cluster": (
        VALID + "store:\n  kind: redis\n  url: redis://h:7000\n  cluster_nodes: [h:7001]  # HERE\n",
        "cluster_nodes needs cluster: true",
    ),
    "cluster_nodes not a list": (
        VALID + "store:\n  kind: redis\n  url: redis://h:7000\n  cluster: true\n"
        "  cluster_nodes: h:7001  # HERE\n",
        "cluster_nodes must be a list of host:port",
    ),
    "cluster node without a port": (
        VALID + "store:\n  kind: redis\n  url: redis://h:7000\n  cluster: true\n"
        "  cluster_nodes:\n    - h:7001\n    - h2  # HERE\n",
        "'h2' is not host:port",
    ),
    "cluster node as a URL": (
        VALID + "store:\n  kind: redis\n  url: redis://h:7000\n  cluster: true\n"
        "  cluster_nodes: ['redis://h:7001']  # HERE\n",
        "'redis://h:7001' is not host:port",
    ),
    "cluster on a unix socket": (
        VALID + "store: {kind: redis, url: 'unix:///run/redis.sock', cluster: true}  # HERE\n",
        "a Redis Cluster is reached over redis:// or rediss://",
    ),
    "cluster with a database": (
        VALID + "store: {kind: redis, url: 'redis://h:7000/2', cluster: true}  # HERE\n",
        "a Redis Cluster has only database 0",
    ),
    "bad reservation_timeout": (
        VALID + "store:\n  kind: memory\n  reservation_timeout: soon  # HERE\n",
        "bad duration",
    ),
    "negative completion_reserve": (
        replaced("    completion_reserve: 64\n", "    completion_reserve: -1  # HERE\n"),
        "completion_reserve must be a whole number >= 0",
    ),
    "bad queue_wait": (
        replaced("    scope: key\n", "    scope: key\n    queue_wait: 2  # HERE\n"),
        "bad duration 2: use a whole number",
    ),
    "proxy names a missing provider": (
        replaced("    provider: filed\n", "    provider: nope  # HERE\n"),
        "provider 'nope' is not defined",
    ),
    "both api_key_env and api_key_file": (
        replaced(
            "  mock-openai:\n", "  mock-openai:  # HERE\n    api_key_file: secrets/provider.key\n"
        ),
        "takes one of api_key_env, api_key_file (none: keyless)",
    ),
    "deployments on an openai provider": (
        replaced("  filed:\n", "  filed:\n    deployments: {prod: gpt-4o}  # HERE\n"),
        "unknown field 'deployments'",
    ),
    "deployments not a mapping": (
        replaced("  filed:\n", "  filed:\n    kind: azure\n    deployments: [prod]  # HERE\n"),
        "deployments must map deployment names to model names",
    ),
    "a deployment's model not text": (
        replaced("  filed:\n", "  filed:\n    kind: azure\n    deployments: {prod: 4}  # HERE\n"),
        "deployments must map deployment names to model names",
    ),
    "unknown kind": (
        replaced("  filed:\n", "  filed:\n    kind: bedrock  # HERE\n"),
        "not 'bedrock'",
    ),
    "missing key file": (
        replaced("api_key_file: secrets/provider.key", "api_key_file: secrets/gone.key  # HERE"),
        "cannot read key file",
    ),
    "bad scope": (
        replaced("    scope: proxy\n", "    scope: everyone  # HERE\n"),
        "scope must be one of key, proxy",
    ),
    "sha256 too short": (
        replaced(f'sha256: "{OTHER_HASH}"}}', 'sha256: "abc123"}  # HERE'),
        "sha256 must be 64 lowercase hex digits",
    ),
    "sha256 upper case": (
        replaced(f'sha256: "{OTHER_HASH}"}}', f'sha256: "{OTHER_HASH.upper()}"}}  # HERE'),
        "sha256 must be 64 lowercase hex digits",
    ),
    "sha256 not hex": (
        replaced(f'sha256: "{OTHER_HASH}"}}', f'sha256: "{"g" * 64}"}}  # HERE'),
        "sha256 must be 64 lowercase hex digits",
    ),
    "non-http base_url": (
        replaced(
            "    base_url: https://api.example.com/v1\n",
            "    base_url: ftp://api.example.com/v1  # HERE\n",
        ),
        "is not an http(s) URL",
    ),
    "base_url without host": (
        replaced(
            "    base_url: https://api.example.com/v1\n", "    base_url: http:///v1  # HERE\n"
        ),
        "is not an http(s) URL",
    ),
    "overlapping contexts": (
        replaced("    context: /shared\n", "    context: /rate-limited-proxy/b  # HERE\n"),
        "overlaps /rate-limited-proxy of proxy 'rate-limited-proxy'",
    ),
    "identical contexts": (
        replaced("    context: /shared\n", "    context: /rate-limited-proxy  # HERE\n"),
        "overlaps /rate-limited-proxy",
    ),
    "duplicate YAML key": (
        replaced("    scope: key\n", "    scope: key\n    scope: proxy  # HERE\n"),
        "duplicate key 'scope'",
    ),
    "duplicate provider name": (
        replaced("  filed:\n", "  mock-openai:  # HERE\n"),
        "duplicate key 'mock-openai'",
    ),
    "invalid YAML syntax": (
        replaced("    version: v1.0\n", "    version: v1.0: x  # HERE\n"),
        "invalid YAML",
    ),
    "same key hash in two proxies": (
        replaced(
            f'      other: {{sha256: "{OTHER_HASH}"}}\n',
            f'      other: {{sha256: "{DEMO_HASH}"}}  # HERE\n',
        ),
        "same secret as key 'test-key' of proxy 'rate-limited-proxy'",
    ),
    "context without leading slash": (
        replaced("    context: /shared\n", "    context: shared  # HERE\n"),
        "must be a path like /my-proxy",
    ),
    "token_limits with unknown dimension": (
        replaced("      prompt_tokens:\n", "      input_tokens:  # HERE\n"),
        "unknown dimension 'input_tokens'",
    ),
    "requests is not a token dimension": (
        replaced("      prompt_tokens:\n", "      requests:  # HERE\n"),
        "unknown dimension 'requests'",
    ),
    "empty limit list": (
        replaced("    request_limits:\n", "    request_limits: []  # HERE\n").replace(
            "      - {count: 10, duration: 90s}\n", ""
        ),
        "must be a non-empty list",
    ),
    "bad proxy name": (
        replaced("  shared:\n", "  'bad name!':  # HERE\n"),
        "bad name",
    ),
    "bad host": (
        replaced("hosts: [127.0.0.1, LocalHost]", "hosts: [127.0.0.1, 'bad/host']  # HERE"),
        "bad host name 'bad/host'",
    ),
    "bad glob in a limit's models": (
        replaced(LIMIT_ITEM, "{count: 100, duration: 1m, models: ['gpt-4o[']}  # HERE"),
        "bad glob 'gpt-4o['",
    ),
    "bad glob in the allow-list": (
        replaced("    scope: key\n", "    scope: key\n    models: [gpt 4o]  # HERE\n"),
        "bad glob 'gpt 4o'",
    ),
    "a limit's scope": (
        replaced(LIMIT_ITEM, "{count: 100, duration: 1m, scope: team}  # HERE"),
        "scope must be one of key, proxy, not 'team'",
    ),
    "usd not a number": (
        replaced(
            "    scope: key\n", "    scope: key\n    budgets: [{usd: five, duration: 1d}]  # HERE\n"
        ),
        "usd must be a positive number of dollars",
    ),
    "usd zero": (
        replaced(
            "    scope: key\n", "    scope: key\n    budgets: [{usd: 0, duration: 1d}]  # HERE\n"
        ),
        "usd must be a positive number of dollars",
    ),
    "usd below a micro-dollar": (
        replaced(
            "    scope: key\n",
            "    scope: key\n    budgets: [{usd: 0.0000001, duration: 1d}]  # HERE\n",
        ),
        "finer than a micro-dollar",
    ),
    "a budget over 31 days": (
        replaced(
            "    scope: key\n", "    scope: key\n    budgets: [{usd: 5, duration: 32d}]  # HERE\n"
        ),
        "a budget's duration is at most 31d",
    ),
    "a budget with a count": (
        replaced(
            "    scope: key\n", "    scope: key\n    budgets: [{count: 5, duration: 1d}]  # HERE\n"
        ),
        "unknown field 'count'",
    ),
    "a weight above 1": (
        replaced(
            "    scope: key\n", "    scope: key\n    weights: {cached_prompt_tokens: 1.5}  # HERE\n"
        ),
        "cached_prompt_tokens must be a number from 0 to 1",
    ),
    "an unknown weight": (
        replaced(
            "    scope: key\n", "    scope: key\n    weights: {reasoning_tokens: 2}  # HERE\n"
        ),
        "unknown field 'reasoning_tokens'",
    ),
    "strict not a boolean": (
        replaced("    scope: key\n", "    scope: key\n    strict: yes please  # HERE\n"),
        "strict must be true or false",
    ),
}

BAD_DURATIONS = ["1w", "0m", "-1m", "10", "1.5m", "1 m"]


@pytest.mark.parametrize(("text", "reason"), BROKEN.values(), ids=BROKEN.keys())
def test_broken_file_names_line_and_reason(setup: Path, text: str, reason: str) -> None:
    expect_error(write(setup, text), marked_line(text), reason)


@pytest.mark.parametrize("duration", BAD_DURATIONS)
def test_bad_duration_names_line(setup: Path, duration: str) -> None:
    text = replaced(LIMIT_ITEM, f"{{count: 100, duration: {duration}}}  # HERE")
    error = expect_error(write(setup, text), marked_line(text), "bad duration")
    assert "use a whole number and one of s, m, h, d" in error.reason


@pytest.mark.parametrize("duration", BAD_DURATIONS)
def test_bad_duration_names_line_block_style(setup: Path, duration: str) -> None:
    text = replaced("          duration: 30s\n", f"          duration: {duration}  # HERE\n")
    expect_error(write(setup, text), marked_line(text), "bad duration")


@pytest.mark.parametrize("value", ["", "   \n"])
def test_empty_env_variable(setup: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ENV, value)
    text = replaced(f"api_key_env: {ENV}", f"api_key_env: {ENV}  # HERE")
    expect_error(write(setup, text), marked_line(text), f"environment variable {ENV} is not set")


def test_unset_env_variable(setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV)
    text = replaced(f"api_key_env: {ENV}", f"api_key_env: {ENV}  # HERE")
    expect_error(write(setup, text), marked_line(text), f"environment variable {ENV} is not set")


@pytest.mark.parametrize("content", ["", " \n\n"])
def test_empty_key_file(setup: Path, content: str) -> None:
    (setup / "secrets" / "provider.key").write_text(content, encoding="utf-8")
    text = replaced(
        "api_key_file: secrets/provider.key", "api_key_file: secrets/provider.key # HERE"
    )
    expect_error(write(setup, text), marked_line(text), "is empty")


def test_invalid_yaml_unclosed_flow_reports_a_line(setup: Path) -> None:
    text = replaced(LIMIT_ITEM, "{count: 100, duration: 1m")
    path = write(setup, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "invalid YAML" in info.value.reason
    # PyYAML notices the unclosed mapping on the following line at the latest.
    assert info.value.line in (marked_line(replaced(LIMIT_ITEM, "# HERE")) + d for d in (0, 1))


def test_missing_quotas_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line is None
    assert "cannot read" in info.value.reason
    assert str(info.value).startswith(f"{path}: ")


def test_missing_required_section(setup: Path) -> None:
    path = write(setup, "providers: {}\n")
    expect_error(path, 1, "needs 'proxies'")


def test_missing_base_url_names_the_provider_line(setup: Path) -> None:
    text = replaced("  filed:\n", "  filed:  # HERE\n").replace(
        "    base_url: https://api.example.com/v1\n", ""
    )
    expect_error(write(setup, text), marked_line(text), "needs 'base_url'")


# --- malformed shapes must still be ConfigErrors (found bugs: these raise other exceptions) ----


@pytest.mark.parametrize(
    "text",
    [
        "providers: 5  # HERE\nproxies: {}\n",
        "providers:  # HERE\n  - {base_url: 'http://h'}\nproxies: {}\n",
        "providers: {}\nproxies: 7  # HERE\n",
    ],
    ids=["providers-int", "providers-list-of-mappings", "proxies-int"],
)
def test_non_mapping_sections_are_config_errors(setup: Path, text: str) -> None:
    expect_error(write(setup, text), marked_line(text), "must be a mapping")


def test_recursive_yaml_alias_is_a_config_error(setup: Path) -> None:
    path = write(setup, "providers: &loop\n  p: *loop\nproxies: {}\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_same_key_hash_twice_in_one_proxy(setup: Path) -> None:
    """Two key names with one secret: lookups could only ever find one of them."""
    text = replaced(
        f'      test-key: {{sha256: "{DEMO_HASH}"}}\n',
        f'      test-key: {{sha256: "{DEMO_HASH}"}}\n'
        f'      copy-key: {{sha256: "{DEMO_HASH}"}}  # HERE\n',
    )
    expect_error(write(setup, text), marked_line(text), "same secret as key 'test-key'")


# --- the store entry -------------------------------------------------------------------------


def test_store_defaults_to_sqlite_beside_the_quotas_file(setup: Path) -> None:
    config = load_config(write(setup, VALID))
    assert config.store == StoreSpec("sqlite", path=setup / ".state" / "tokengate.sqlite3")
    assert config.store.reservation_timeout == 600
    assert all(proxy.fail == "closed" for proxy in config.proxies.values())
    assert config.summary().endswith("; store sqlite")


def test_store_entries(setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = load_config(write(setup, VALID + "store: {kind: memory, reservation_timeout: 2m}\n"))
    assert memory.store == StoreSpec("memory", reservation_timeout=120)
    sqlite = load_config(write(setup, VALID + "store: {kind: sqlite, path: /tmp/x/u.db}\n"))
    assert sqlite.store.path == Path("/tmp/x/u.db")
    relative = load_config(write(setup, VALID + "store: {kind: sqlite, path: db/u.db}\n"))
    assert relative.store.path == setup / "db" / "u.db"
    url = "rediss://:s3cret@127.0.0.1:6380/2"
    redis = load_config(write(setup, VALID + f"store: {{kind: redis, url: '{url}'}}\n"))
    assert redis.store.url == url
    assert "s3cret" not in repr(redis.store)  # the password never reaches a log via repr
    monkeypatch.setenv("TG_TEST_REDIS_URL", url)
    from_env = load_config(
        write(setup, VALID + "store: {kind: redis, url_env: TG_TEST_REDIS_URL}\n")
    )
    assert from_env.store.url == url
    assert not from_env.store.cluster


def test_redis_cluster_entries(setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = load_config(
        write(setup, VALID + "store: {kind: redis, url: 'redis://10.0.0.1:7000', cluster: true}\n")
    )
    assert one.store == StoreSpec("redis", url="redis://10.0.0.1:7000", cluster=True)
    seeds = "store:\n  kind: redis\n  cluster: true\n  url_env: TG_TEST_REDIS_URL\n"
    seeds += "  cluster_nodes: ['10.0.0.2:7000', 'redis-3.internal:7001', '[fd00::4]:7000']\n"
    monkeypatch.setenv("TG_TEST_REDIS_URL", "rediss://:s3cret@10.0.0.1:7000/0")
    several = load_config(write(setup, VALID + seeds))
    assert several.store.cluster_nodes == (
        ("10.0.0.2", 7000),
        ("redis-3.internal", 7001),
        ("fd00::4", 7000),
    )
    assert several.store.place != one.store.place  # a reload onto other seeds opens a new store
    monkeypatch.delenv("TG_TEST_REDIS_URL")
    unread = load_config(write(setup, VALID + seeds), check_credentials=False)
    assert unread.store.cluster and len(unread.store.cluster_nodes) == 3


def test_redis_url_env_unset(setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TG_TEST_REDIS_URL", raising=False)
    path = write(setup, VALID + "store: {kind: redis, url_env: TG_TEST_REDIS_URL}\n")
    expect_error(path, VALID.count("\n") + 1, "TG_TEST_REDIS_URL is not set")


def test_fail_open(setup: Path) -> None:
    config = load_config(
        write(setup, replaced("    scope: proxy\n", "    scope: proxy\n    fail: open\n"))
    )
    assert config.proxies["shared"].fail == "open"
    assert config.proxies["rate-limited-proxy"].fail == "closed"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2026-02-30T00:00:00Z", "bad value '2026-02-30T00:00:00Z' (timestamp): day is out of"),
        ("0000-01-01", "bad value '0000-01-01' (timestamp): year 0 is out of range"),
        ("2026-01-01T00:00:00+99:00", "bad value '2026-01-01T00:00:00+99:00' (timestamp)"),
        ("!!bool maybe", "bad value 'maybe' (bool)"),
        ("!!binary 'x!'", "bad value 'x!' (binary): failed to decode base64 data"),
    ],
    ids=["impossible-date", "year-zero", "offset-too-large", "bad-bool", "bad-binary"],
)
def test_a_value_yaml_cannot_construct_names_its_line(setup: Path, value: str, reason: str) -> None:
    """PyYAML raises ValueError and others for these, not a YAML error: still file:line: reason."""
    text = replaced(
        f'      test-key: {{sha256: "{DEMO_HASH}"}}\n',
        f'      test-key: {{sha256: "{DEMO_HASH}", expires: {value}}}  # HERE\n',
    )
    expect_error(write(setup, text), marked_line(text), reason)
