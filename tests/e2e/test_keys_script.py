"""tokengate-keys: a created key works, only its hash is written, and the file keeps its layout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from tokengate_core.audit import iso_time
from tokengate_core.config import load_config
from tokengate_core.keys import format_timestamp, hash_key
from tokengate_core.tools import keys as keys_script

from tests.support.processes import ROOT

QUOTAS = """\
# top comment
providers:
  mock:
    base_url: http://127.0.0.1:1/v1
    api_key_env: TOKENGATE_TEST_PROVIDER_KEY
proxies:
  with-keys:
    context: /a      # a comment that must survive
    provider: mock
    keys:
      old: {sha256: "%s"}
  without-keys:
    context: /b
    provider: mock
    token_limits:
      total_tokens:
        - {count: 10, duration: 1m}
  # trailing comment
""" % ("0" * 64)


def create(config, proxy, name):
    return subprocess.run(
        [sys.executable, "scripts/keys.py", "create", proxy, name, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("proxy", ["with-keys", "without-keys"])
def test_created_key_authenticates_and_layout_survives(tmp_path, monkeypatch, proxy):
    monkeypatch.setenv("TOKENGATE_TEST_PROVIDER_KEY", "sk-x")
    config = tmp_path / "quotas.yaml"
    config.write_text(QUOTAS)
    result = create(config, proxy, "new-app")
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip().splitlines()[-1]
    assert secret.startswith("tg-") and len(secret) > 40
    text = config.read_text()
    assert secret not in text
    for line in QUOTAS.splitlines():  # every original line is still there, in order
        assert line in text
    loaded = load_config(config)
    found = loaded.proxies[proxy].keys.find(secret)
    assert found is not None and found.name == "new-app"
    other = "without-keys" if proxy == "with-keys" else "with-keys"
    assert loaded.proxies[other].keys.find(secret) is None


def test_refuses_duplicates_and_unknown_proxies(tmp_path):
    config = tmp_path / "quotas.yaml"
    config.write_text(QUOTAS)
    assert create(config, "with-keys", "old").returncode != 0
    missing = create(config, "nope", "x")
    assert missing.returncode != 0 and "no proxy 'nope'" in missing.stderr
    assert config.read_text() == QUOTAS


def run(config, *args):
    return subprocess.run(
        [sys.executable, "scripts/keys.py", *args, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def secret_of(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "quotas.yaml"
    path.write_text(QUOTAS)
    return path


def keys_of(config, proxy="with-keys"):
    # The script validates without provider credentials; so do these checks.
    return load_config(config, check_credentials=False).proxies[proxy].keys


def named(config, name, proxy="with-keys"):
    return {key.name: key for key in keys_of(config, proxy)}[name]


def test_create_writes_created_and_expiry_and_replaces_the_file_by_rename(config):
    inode = config.stat().st_ino
    before = time.time()
    secret = secret_of(run(config, "create", "with-keys", "temp", "--expires", "2h"))
    key = keys_of(config).find(secret)
    assert key.name == "temp"
    assert before - 1 <= key.created <= time.time()
    assert key.expires == pytest.approx(key.created + 7200, abs=1)
    assert config.stat().st_ino != inode  # a new file took the old one's place in one rename
    assert sorted(p.name for p in config.parent.iterdir()) == ["quotas.yaml"]  # no temp left
    line = next(line for line in config.read_text().splitlines() if "temp:" in line)
    assert re.fullmatch(
        r'      temp: \{sha256: "[0-9a-f]{64}", created: "[0-9T:-]+Z", expires: "[0-9T:-]+Z"\}',
        line,
    )


def test_revoke_leaves_a_marker_and_every_other_line(config):
    secret = secret_of(run(config, "create", "with-keys", "gone"))
    result = run(config, "revoke", "with-keys", "gone")
    assert result.returncode == 0, result.stderr
    text = config.read_text()
    assert keys_of(config).find(secret) is None
    assert re.search(r"^      # revoked gone \d{4}-\d\d-\d\dT[\d:]+Z$", text, re.M)
    assert text.replace(re.search(r"      # revoked gone .*\n", text).group(0), "") == QUOTAS
    # The last key of a proxy too: `keys:` is left with the marker only, and still loads.
    assert run(config, "revoke", "with-keys", "old").returncode == 0
    assert len(keys_of(config)) == 0
    assert run(config, "revoke", "with-keys", "old").returncode != 0  # already gone


def test_rotate_keeps_the_name_and_the_old_secret_for_the_grace_period(config):
    old = secret_of(run(config, "create", "with-keys", "app"))
    result = run(config, "rotate", "with-keys", "app", "--grace", "1h")
    new = secret_of(result)
    assert new != old
    keys = keys_of(config)
    fresh, previous = keys.find(new), keys.find(old)
    assert fresh.name == "app" and fresh.expires is None
    assert previous.name.startswith("app.rotated-")
    assert previous.expires == pytest.approx(time.time() + 3600, abs=5)
    assert "works until" in result.stdout and previous.name in result.stdout
    # An old secret that expires before the grace ends keeps its earlier expiry, and says so.
    assert run(config, "expire", "with-keys", "app", "10m").returncode == 0
    again = run(config, "rotate", "with-keys", "app", "--grace", "1d")
    once = secret_of(again)
    earlier = keys_of(config).find(new)
    assert earlier.expires == pytest.approx(time.time() + 600, abs=5)
    assert f"works until {format_timestamp(earlier.expires)}." in again.stdout
    assert keys_of(config).find(once).expires == earlier.expires  # the key's own expiry


def test_rotate_keeps_the_keys_expiry_on_the_new_secret(config):
    old = secret_of(run(config, "create", "with-keys", "app", "--expires", "30d"))
    expires = keys_of(config).find(old).expires
    new = secret_of(run(config, "rotate", "with-keys", "app", "--grace", "1h"))
    keys = keys_of(config)
    assert keys.find(new).expires == expires == pytest.approx(time.time() + 30 * 86400, abs=5)
    assert keys.find(old).expires == pytest.approx(time.time() + 3600, abs=5)


def test_rotate_a_key_with_the_longest_name(config):
    name = "a" * 64
    old = secret_of(run(config, "create", "with-keys", name))
    new = secret_of(run(config, "rotate", "with-keys", name, "--grace", "1h"))
    keys = keys_of(config)
    assert keys.find(new).name == name
    rotated = keys.find(old).name
    assert len(rotated) <= 64 and rotated.startswith("a" * 33 + "-")
    assert ".rotated-" in rotated


def test_rotated_names_stay_within_the_limit_and_apart():
    now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    taken: set[str] = set()
    for name in ("a" * 64, "a" * 64, "a" * 60 + "bbbb", "a" * 40, "app", "app"):
        rotated = keys_script.rotated_name(name, now, taken)
        assert len(rotated) <= 64 and rotated not in taken
        taken.add(rotated)
    assert {"app.rotated-20270115T080000", "app.rotated-20270115T080000-2"} <= taken
    assert "a" * 40 + ".rotated-20270115T080000" in taken  # 64 characters: kept whole


def test_expire_sets_and_clears(config):
    assert run(config, "expire", "with-keys", "old", "2030-01-02T03:04:05Z").returncode == 0
    assert named(config, "old").expires == 1893553445.0
    assert 'expires: "2030-01-02T03:04:05Z"' in config.read_text()
    assert run(config, "expire", "with-keys", "old", "now").returncode == 0
    assert named(config, "old").expired(time.time())
    assert run(config, "expire", "with-keys", "old", "never").returncode == 0
    assert named(config, "old").expires is None
    assert config.read_text() == QUOTAS  # the entry is back as it was written
    bad = run(config, "expire", "with-keys", "old", "next tuesday")
    assert bad.returncode != 0 and "is not a time" in bad.stderr


def test_an_edit_that_would_not_validate_leaves_the_file_alone(config):
    broken = QUOTAS.replace("provider: mock\n    token_limits", "provider: nope\n    token_limits")
    config.write_text(broken)
    result = run(config, "create", "with-keys", "x")
    assert result.returncode != 0
    assert "left as it was" in result.stderr and "provider 'nope' is not defined" in result.stderr
    assert config.read_text() == broken
    assert sorted(p.name for p in config.parent.iterdir()) == ["quotas.yaml"]


def ledger_line(at: float, key: str, secret: str | None = None, **extra) -> str:
    """A live ledger line; with `secret`, carrying its fingerprint as the gate writes it."""
    fp = {"key_fp": hash_key(secret)[:16]} if secret else {}
    line = {"time": iso_time(at), "proxy": "with-keys", "key": key, **fp, "status": 200}
    return json.dumps(line | extra) + "\n"


def listed(config) -> dict[str, list[str]]:
    result = run(config, "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:5] == ["proxy", "key", "created", "last", "used"]
    return {line.split()[1]: line.split() for line in result.stdout.splitlines()[1:]}


def test_list_shows_dates_and_last_use_from_the_ledger_never_secrets(config):
    secret = secret_of(run(config, "create", "with-keys", "app", "--expires", "3d"))
    assert run(config, "expire", "with-keys", "old", "now").returncode == 0
    now = time.time()
    ledger = config.parent / ".state" / "ledger.jsonl"
    ledger.parent.mkdir()
    ledger.write_text(
        ledger_line(now - 300, "app", secret)
        + "not json, a line cut short\n"
        + ledger_line(now + 40, "app", secret, replay=True)  # a replay is not a use of the key
        + ledger_line(now - 3600, "old")  # before fingerprints: by name ("old" has no date)
        + ledger_line(now - 60, "app")  # by name, but this "app" did not exist then ...
    )
    ledger.with_name("ledger.jsonl.1").write_text(
        ledger_line(now - 200, "app", secret)  # rotated files count too
        + ledger_line(now + 50, "app", secret, proxy="other")
        + ledger_line(now - 7200, "app")  # ... nor then
    )
    rows = listed(config)
    assert rows["app"][3] == iso_time(now - 200)
    assert rows["app"][5] == "(in" and rows["app"][6] in ("2d23h)", "3d0h)")
    assert rows["old"][2:4] == ["-", iso_time(now - 3600)] and rows["old"][5] == "(expired)"
    result = run(config, "list")
    assert secret not in result.stdout and hash_key(secret) not in result.stdout
    assert "0" * 64 not in result.stdout
    only = run(config, "list", "without-keys")
    assert only.returncode == 0 and "app" not in only.stdout
    elsewhere = run(config, "list", "--ledger", str(config.parent / "none.jsonl"))
    assert iso_time(now - 200) not in elsewhere.stdout


def test_after_a_rotation_each_secret_shows_its_own_last_use(config):
    first = secret_of(run(config, "create", "with-keys", "app"))
    now = time.time()
    ledger = config.parent / ".state" / "ledger.jsonl"
    ledger.parent.mkdir()
    ledger.write_text(ledger_line(now + 10, "app", first))
    second = secret_of(run(config, "rotate", "with-keys", "app", "--grace", "1h"))
    rotated = keys_of(config).find(first).name
    rows = listed(config)
    assert rows[rotated][3] == iso_time(now + 10)
    assert rows["app"][3] == "-"  # the new secret has not been used yet
    with ledger.open("a") as handle:
        handle.write(ledger_line(now + 20, "app", second) + ledger_line(now + 30, "app", first))
    rows = listed(config)
    assert (rows["app"][3], rows[rotated][3]) == (iso_time(now + 20), iso_time(now + 30))


def test_bad_names_and_grace_periods_are_refused_without_touching_the_file(config):
    bad = run(config, "create", "with-keys", "no spaces")
    assert bad.returncode != 0 and "bad name 'no spaces'" in bad.stderr
    grace = run(config, "rotate", "with-keys", "old", "--grace", "2030-01-01T00:00:00Z")
    assert grace.returncode != 0 and "--grace: bad duration" in grace.stderr
    assert config.read_text() == QUOTAS


def test_a_date_that_does_not_exist_is_refused_with_its_line(config):
    broken = QUOTAS.replace('"}\n', '", expires: 2026-02-30T00:00:00Z}\n', 1)
    config.write_text(broken)
    for command in (["list"], ["create", "with-keys", "x"]):
        result = run(config, *command)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert f"{config}:11: bad value '2026-02-30T00:00:00Z'" in result.stderr
    assert config.read_text() == broken
