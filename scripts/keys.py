"""Create a caller key for a proxy: prints the secret once and writes only its SHA-256.

    python scripts/keys.py create PROXY NAME [--config quotas.yaml]

The key is added under `proxies.PROXY.keys` of the quotas file with a line edit, so the rest of
the file (comments, layout) stays exactly as it was.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tokengate_core.keys import generate_key, hash_key
from tokengate_core.yamlsource import ConfigError, load_document


def add_key(config_path: Path, proxy: str, name: str, secret: str) -> None:
    """Insert `name: {sha256: …}` under the proxy's `keys:` mapping (created if missing)."""
    doc = load_document(config_path)
    proxies = (doc.data or {}).get("proxies") or {}
    if proxy not in proxies:
        raise SystemExit(f"{config_path}: no proxy {proxy!r} (have: {', '.join(proxies)})")
    keys = proxies[proxy].get("keys") or {}
    if name in keys:
        raise SystemExit(f"{config_path}: proxy {proxy!r} already has a key {name!r}")
    lines = config_path.read_text(encoding="utf-8").splitlines(keepends=True)
    proxy_line = doc.lines[("proxies", proxy)] - 1
    proxy_indent = len(lines[proxy_line]) - len(lines[proxy_line].lstrip())
    entry = f'{name}: {{sha256: "{hash_key(secret)}"}}\n'
    if ("proxies", proxy, "keys") in doc.lines and keys:
        first = doc.lines[("proxies", proxy, "keys", next(iter(keys)))] - 1
        indent = len(lines[first]) - len(lines[first].lstrip())
        lines.insert(first, " " * indent + entry)
    elif ("proxies", proxy, "keys") in doc.lines:
        keys_line = doc.lines[("proxies", proxy, "keys")] - 1
        lines[keys_line] = re.sub(r"keys:.*", "keys:", lines[keys_line].rstrip("\n")) + "\n"
        lines.insert(keys_line + 1, " " * (proxy_indent + 4) + entry)
    else:
        end = _block_end(lines, proxy_line, proxy_indent)
        lines[end:end] = [" " * (proxy_indent + 2) + "keys:\n", " " * (proxy_indent + 4) + entry]
    config_path.write_text("".join(lines), encoding="utf-8")


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index just after the last non-blank line indented deeper than `indent` after `start`."""
    end = start + 1
    for index in range(start + 1, len(lines)):
        text = lines[index]
        if text.strip() and not text.lstrip().startswith("#"):
            if len(text) - len(text.lstrip()) <= indent:
                break
            end = index + 1
    return end


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it once")
    create.add_argument("proxy")
    create.add_argument("name")
    create.add_argument("--config", type=Path, default=Path("quotas.yaml"))
    args = parser.parse_args(argv)
    secret = generate_key()
    try:
        add_key(args.config, args.proxy, args.name, secret)
        load_document(args.config)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Created key {args.name!r} for proxy {args.proxy!r}. It is shown only this once:")
    print(secret)
    return 0


if __name__ == "__main__":
    sys.exit(main())
