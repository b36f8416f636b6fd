"""Caller keys as the gate reads them: where a request carries one, how keys are stored and
found, and the timestamps of `created` and `expires`."""

from __future__ import annotations

import datetime
import hashlib
import re
import time

import pytest
from tokengate_core.keys import (
    KEY_PREFIX,
    KeyRing,
    StoredKey,
    caller_key,
    format_timestamp,
    generate_key,
    hash_key,
    parse_timestamp,
)

from tests.support.quotas import ALICE, BOB

NEW_YEAR = 1_798_761_600.0  # 2027-01-01T00:00:00Z


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": f"Bearer {ALICE}"}, ALICE),
        ({"authorization": f"bearer {ALICE}"}, ALICE),  # the scheme in any case
        ({"authorization": f"  BEARER   {ALICE}  "}, ALICE),  # spaces around either part
        ({"x-api-key": f" {ALICE} "}, ALICE),
        ({"x-api-key": ALICE, "authorization": f"Bearer {ALICE}"}, ALICE),
        ({"x-api-key": "  ", "authorization": f"Bearer {ALICE}"}, ALICE),  # a blank one: the other
        ({"authorization": f"Basic {ALICE}"}, None),
        ({"authorization": f"Bearer{ALICE}"}, None),  # no space: not the Bearer scheme
        ({"authorization": "Bearer"}, None),
        ({"authorization": "Bearer    "}, None),
        ({"authorization": ""}, None),
        ({"x-api-key": ""}, None),
        ({}, None),
    ],
)
def test_caller_key_from_x_api_key_or_bearer(headers, key):
    assert caller_key(headers) == key


def test_keys_are_found_by_digest_only():
    alice = StoredKey("alice", hash_key(ALICE))
    ring = KeyRing([alice, StoredKey("bob", hash_key(BOB))])
    assert len(ring) == 2
    assert [key.name for key in ring] == ["alice", "bob"]
    assert ring.find(ALICE) is alice
    assert ring.find(BOB).name == "bob"
    for guess in (ALICE + " ", ALICE.upper(), ALICE[:-1], hash_key(ALICE), ""):
        assert ring.find(guess) is None, guess
    assert len(KeyRing([])) == 0 and KeyRing([]).find(ALICE) is None


def test_hash_is_sha256_hex_of_the_utf8_key():
    assert hash_key("tg-x") == hashlib.sha256(b"tg-x").hexdigest()
    assert hash_key("tg-\u00e9") == hashlib.sha256("tg-\u00e9".encode()).hexdigest()
    # A header mitmproxy could not decode arrives with surrogates: it still hashes, never raises.
    assert hash_key("tg-\udcff") == hashlib.sha256(b"tg-\xff").hexdigest()


def test_generated_keys_are_prefixed_and_carry_256_random_bits():
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith(KEY_PREFIX) and KEY_PREFIX == "tg-"
        assert re.fullmatch(r"tg-[A-Za-z0-9_-]{43}", key), key  # 32 bytes, URL-safe base64


def test_a_key_expires_at_its_expiry_not_after():
    key = StoredKey("alice", hash_key(ALICE), expires=NEW_YEAR)
    assert not key.expired(NEW_YEAR - 0.001)
    assert key.expired(NEW_YEAR) and key.expired(NEW_YEAR + 1)
    assert not StoredKey("bob", hash_key(BOB)).expired(NEW_YEAR * 10)


@pytest.mark.parametrize(
    "value",
    [
        "2027-01-01T00:00:00Z",
        "2027-01-01T00:00:00",  # no zone: UTC, the same on every machine
        " 2027-01-01 ",
        "2027-01-01T01:00:00+01:00",
        datetime.datetime(2027, 1, 1),  # what YAML makes of an unquoted timestamp
        datetime.datetime(2026, 12, 31, 19, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
    ],
)
def test_timestamps_are_iso_8601_read_as_utc(value):
    assert parse_timestamp(value) == NEW_YEAR


@pytest.mark.parametrize("value", ["tomorrow", "", "2027-13-01", 1798761600, None])
def test_a_bad_timestamp_says_what_to_write(value):
    with pytest.raises(ValueError, match=r"^bad timestamp .*: use ISO 8601, e\.g\. 2026-12-31T"):
        parse_timestamp(value)


@pytest.fixture
def far_from_utc(monkeypatch):
    """The process's local time zone is New York's (the tests otherwise run where it is UTC)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_timestamps_mean_utc_whatever_the_machines_zone(far_from_utc):
    assert time.localtime(NEW_YEAR).tm_hour == 19  # the zone did change
    assert parse_timestamp("2027-01-01T00:00:00") == NEW_YEAR
    assert parse_timestamp(datetime.datetime(2027, 1, 1)) == NEW_YEAR
    assert format_timestamp(NEW_YEAR) == "2027-01-01T00:00:00Z"


def test_timestamps_are_written_in_utc_to_the_second():
    assert format_timestamp(NEW_YEAR) == "2027-01-01T00:00:00Z"
    assert format_timestamp(NEW_YEAR + 3661.9) == "2027-01-01T01:01:01Z"
    assert parse_timestamp(format_timestamp(NEW_YEAR + 59)) == NEW_YEAR + 59
