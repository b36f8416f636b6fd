"""The text of quotas files for tests: caller keys and `proxies:` entries."""

from __future__ import annotations

from tokengate_core.keys import hash_key

ALICE = "tg-alice-secret-key"
BOB = "tg-bob-secret-key"


def key_entries(indent: int = 6, **keys: str) -> str:
    """YAML lines for `keys:` entries, name -> secret."""
    pad = " " * indent
    return "".join(
        f'{pad}{name}: {{sha256: "{hash_key(secret)}"}}\n' for name, secret in keys.items()
    )


# The harness gate's proxy: alice on 1,000 total tokens a minute.
PROXIES = (
    "  p:\n    context: /p\n    provider: mock\n"
    "    token_limits:\n      total_tokens:\n        - {count: 1000, duration: 1m}\n"
    "    keys:\n" + key_entries(alice=ALICE)
)


def proxies(count: int, extra: str = "") -> str:
    return (
        "  p:\n    context: /p\n    provider: mock\n"
        f"    token_limits:\n      total_tokens:\n        - {{count: {count}, duration: 1m}}\n"
        f"{extra}"
        "    keys:\n" + key_entries(alice=ALICE)
    )


def proxy_yaml(count: int = 100, duration: str = "1m", scope: str = "key", extra: str = "") -> str:
    return (
        "  rate-limited-proxy:\n"
        "    version: v1.0\n"
        "    context: /rate-limited-proxy\n"
        "    provider: mock\n"
        f"    scope: {scope}\n"
        "    token_limits:\n"
        "      total_tokens:\n"
        f"        - {{count: {count}, duration: {duration}}}\n"
        f"{extra}"
        "    keys:\n" + key_entries(alice=ALICE, bob=BOB)
    )
